"""W1A8: binary weights with 8-bit activations for a binary-weight (BWN) student's convs.

A BWN conv computes ``alpha * sign(W) (*) x``. Here ``x`` is quantized symmetrically per tensor,
``x ~ s * q`` with ``q = clamp(rint(x / s), -127, 127)`` (int8, never -128, so a sum of 4 is
at most 508 in magnitude), and the conv runs on integers: ``acc = sign(W) (*) q`` exactly in int32
(`kd_bnn.deploy.kernels.w1a8_conv2d`), then ``(alpha * s) * acc + bias`` and the activation in
float32. ``s = absmax / 127`` of the conv's input over calibration images (the "max" calibrator
of TensorRT and of PyTorch's MinMaxObserver). Between consecutive W1A8 convs the producer writes
int8 directly with the consumer's scale (a max-pool in between commutes with the monotone
quantizer), so the float map is never formed.

Which convs: binary convs in ``bwn`` mode that the kernel runs (groups 1, no dilation, equal
strides, symmetric zero padding, no XNOR-Net input scaling); the rest stay exact BWN.
Metadata (format version 3, see `kd_bnn.deploy.format`): ``activations = {"bits": 8,
"calibration_images": N, "statistic": "max"}`` and ``act_scale`` (the input scale ``s``) on each
W1A8 layer entry; docs/architecture.md, "The .kdbnn file".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d, conv_explicit_padding
from kd_bnn.deploy.format import FormatError

__all__ = ["ACT_BITS", "QMAX", "calibrate_activations", "check_activations", "inverse_scale", "w1a8_reason"]

ACT_BITS = 8
QMAX = 2 ** (ACT_BITS - 1) - 1  # 127: symmetric, -128 unused
STATISTICS = ("max",)
_META_KEYS = {"bits", "calibration_images", "statistic"}


def inverse_scale(scale: float) -> float:
    """``1 / scale`` rounded to float32: the multiplier the quantizer ``rint(x * inv)`` uses (one
    value shared by the kernels and their torch reference, so both quantize identically)."""
    return float(np.float32(1.0 / float(scale)))  # no tensor: called per W1A8 layer and forward


def w1a8_reason(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot run with 8-bit activations, or None when it can."""
    if not isinstance(conv, BinaryConv2d):
        return "not a binary conv"
    if conv.mode != "bwn":
        return f"mode {conv.mode!r} (W1A8 is for binary-weight convs with real-valued inputs)"
    if conv.input_scaling != "none":
        return f"input scaling {conv.input_scaling!r}"
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.stride[0] != conv.stride[1]:
        return "grouped, dilated or unequal strides"
    pad = conv_explicit_padding(conv)
    if len(set(pad)) != 1 or (pad[0] and conv.padding_mode != "zeros"):
        return "asymmetric or non-zero padding"
    return None


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[dict[str, float], int]:
    """Input scales of the model's W1A8-capable convs (`w1a8_reason`) from float batches
    ``(B, 3, H, W)``: ``s = max |x| / 127`` over all images (1.0 for an input that stayed 0).

    Returns ``({conv path: s}, number of images)``. The model runs in eval mode, restored after.
    """
    convs = {path: m for path, m in model.named_modules() if w1a8_reason(m) is None}
    peak = dict.fromkeys(convs, 0.0)

    def hook(path: str):
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
            peak[path] = max(peak[path], float(args[0].detach().abs().amax()))
        return record

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in convs.items()]
    was_training = model.training
    model.eval()
    images = 0
    try:
        for x in batches:
            model(x)
            images += int(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if images == 0:
        raise ValueError("calibration needs at least one image")
    bad = [p for p, v in peak.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"calibration: the input of {bad[0]} is not finite (inf/NaN): the model or the images "
                         "are broken")
    scales = {p: float(torch.tensor(v / QMAX if v > 0 else 1.0, dtype=torch.float32)) for p, v in peak.items()}
    return scales, images


def check_activations(meta: dict[str, Any]) -> dict[str, float]:
    """The W1A8 layers of a file's metadata: ``{path: input scale}`` (empty without
    ``activations``). Raises ``FormatError`` naming the key for anything else: other bits or
    statistic, unknown keys, a scale that is not a positive finite number, a scale on a layer
    that is not a binary conv or without ``activations``."""
    act = meta.get("activations")
    layers = meta.get("layers") or []
    scaled = [e for e in layers if isinstance(e, dict) and "act_scale" in e]
    if act is None:
        if scaled:
            raise FormatError(f"layer '{scaled[0].get('path')}' has 'act_scale' but the metadata has no "
                              "'activations' section")
        return {}
    if not isinstance(act, dict) or set(act) - _META_KEYS:
        found = sorted(act) if isinstance(act, dict) else type(act).__name__
        raise FormatError(f"metadata 'activations': expected keys {sorted(_META_KEYS)}, found {found}")
    if act.get("bits") != ACT_BITS:
        raise FormatError(f"metadata 'activations.bits': this runtime runs {ACT_BITS}-bit activations, "
                          f"found {act.get('bits')!r}")
    if act.get("statistic", "max") not in STATISTICS:
        raise FormatError(f"metadata 'activations.statistic': expected one of {STATISTICS}, "
                          f"found {act.get('statistic')!r}")
    n = act.get("calibration_images", 0)
    if type(n) is not int or n < 0:
        raise FormatError(f"metadata 'activations.calibration_images': expected a count, found {n!r}")
    out: dict[str, float] = {}
    for e in scaled:
        s, path = e["act_scale"], e.get("path")
        if e.get("kind") != "binary_conv":
            raise FormatError(f"layer '{path}': 'act_scale' on a {e.get('kind')!r} layer (only binary convs)")
        if type(s) not in (int, float) or not math.isfinite(s) or s <= 0:
            raise FormatError(f"layer '{path}': 'act_scale' must be a positive finite number, found {s!r}")
        out[path] = float(s)
    return out
