"""Darknet models: cfg parser, ``.weights`` reader/writer and the PyTorch `DarknetDetector`.

Importing this package registers the ``"darknet"`` detector family in
:data:`kd_bnn.models.detector.DETECTORS`.
"""

from kd_bnn.models.darknet.cfg import CfgError, Section, format_cfg, parse_cfg, parse_cfg_text
from kd_bnn.models.darknet.model import (
    DarknetConv,
    DarknetDetector,
    darknet,
    darknet_maxpool,
    darknet_reorg,
    load_darknet,
    random_weights_,
    save_darknet,
)
from kd_bnn.models.darknet.weights import WeightsError, WeightsHeader, read_weights, write_weights

__all__ = [
    "CfgError", "DarknetConv", "DarknetDetector", "Section", "WeightsError", "WeightsHeader",
    "darknet", "darknet_maxpool", "darknet_reorg", "format_cfg", "load_darknet", "parse_cfg",
    "parse_cfg_text", "random_weights_", "read_weights", "save_darknet", "write_weights",
]
