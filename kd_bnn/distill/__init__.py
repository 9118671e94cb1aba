"""Knowledge transfer: feature taps, adapters, distillation losses and the `Distiller`."""

from kd_bnn.distill.adapters import Adapter, Resize, build_adapter
from kd_bnn.distill.distiller import Distiller, build_distiller
from kd_bnn.distill.losses import (
    DISTILL_LOSSES,
    AttentionTransfer,
    ChannelWiseDistill,
    DistillContext,
    DistillLoss,
    MimicL2,
    MimicMasked,
    OutputKD,
    attention_map,
    boxes_to_mask,
)
from kd_bnn.distill.taps import FeatureTaps, TapError, remove_tap_hooks, resolve_tap, unwrap_model

__all__ = [
    "Adapter", "Resize", "build_adapter", "Distiller", "build_distiller", "DISTILL_LOSSES",
    "AttentionTransfer", "ChannelWiseDistill", "DistillContext", "DistillLoss", "MimicL2",
    "MimicMasked", "OutputKD", "attention_map", "boxes_to_mask", "FeatureTaps", "TapError",
    "remove_tap_hooks", "resolve_tap", "unwrap_model",
]
