"""Binary layers, model conversion and compression accounting (BinaryConnect, XNOR-Net, Xu et al. 2019).

* :mod:`~kd_bnn.binary.quantizers`: ``QUANTIZERS`` (``ste_sign``, ``stochastic_sign``,
  ``approx_sign``) and the weight / activation scaling factors.
* :mod:`~kd_bnn.binary.layers`: ``BinaryConv2d`` (``bwn`` / ``xnor``), ``clip_latent_weights``.
* :mod:`~kd_bnn.binary.convert`: ``binarize(model, policy) -> (model, report)``, staged binarization.
* :mod:`~kd_bnn.binary.summary`: ``summary(model, input_size)`` and the packed-size contract.
"""

from kd_bnn.binary.convert import (
    ConversionReport,
    ConvRow,
    StageGroup,
    apply_stages,
    as_policy,
    binarize,
    first_conv_path,
    prediction_conv_paths,
    stage_groups,
)
from kd_bnn.binary.layers import BinaryConv2d, binary_convs, clip_latent_weights
from kd_bnn.binary.quantizers import QUANTIZERS, approx_sign, ste_sign, stochastic_sign
from kd_bnn.binary.summary import (
    conv_bn_pairs,
    float32_model_bytes,
    packed_conv_bytes,
    packed_layer_bytes,
    packed_model_bytes,
    summary,
)

__all__ = [
    "QUANTIZERS",
    "BinaryConv2d",
    "ConversionReport",
    "ConvRow",
    "StageGroup",
    "apply_stages",
    "approx_sign",
    "as_policy",
    "binarize",
    "binary_convs",
    "clip_latent_weights",
    "conv_bn_pairs",
    "first_conv_path",
    "float32_model_bytes",
    "packed_conv_bytes",
    "packed_layer_bytes",
    "packed_model_bytes",
    "prediction_conv_paths",
    "stage_groups",
    "ste_sign",
    "stochastic_sign",
    "summary",
]
