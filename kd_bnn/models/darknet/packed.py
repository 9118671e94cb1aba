"""The Darknet graph on packed sign words: which layers may pass packed bits, and the forward
that does it (the `Detector.packed_plan` / `packed_forward` hooks of `DarknetDetector`).

The kernels and packed tensors belong to the runtime, which hands them in as ``ops``
(`kd_bnn.models.detector.PackedOps`); this module only knows the Darknet layer types.
A layer may output packed bits when it is an XNOR block (a packed XNOR conv with nothing after the
kernel: BN folded, activation fused or linear), a max-pool, or a float conv block with a
sign-preserving activation (leaky, linear: the activation is skipped when only signs are used),
and every consumer (the next layer, and every route/shortcut naming it) only needs the sign: an
XNOR block, or a max-pool that itself outputs packed bits. Routes, reorgs, shortcuts, float convs
and heads get floats as before.

Besides packed bits, the plan marks one fusion of float layers: a stem conv block (the runtime's
small-C_in conv kernel, activation fused; ``ops.stem_pool``) whose only consumer is the next
layer, a Darknet 2x2 stride-2 max-pool with padding 0 or 1, is run as one kernel call that writes
only the pooled map (:data:`STEM_POOL` at the conv's index; the pool then passes its input on).
W1A8 blocks (binary weights, 8-bit activations) whose consumers are W1A8 blocks, directly or
through max-pools, write int8 in the consumer's scale (``plan.int8``), so those maps are 4x smaller
and never formed in float.
Any other float-output conv block followed by such a pool runs with it in bands of output rows
(:data:`CONV_POOL`, ``ops.conv_pool``), so the full-resolution map - the largest activation of a
detector's first stages - is never held.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.models.darknet.model import DarknetConv, MaxPool, Route, Shortcut

__all__ = ["CONV_POOL", "STEM_POOL", "DarknetPlan", "conv_pool_fusable", "packed_forward", "packed_maxpool", "packed_plan",
           "stem_pool_fusable", "xnor_block"]

#: Plan entry of a stem conv whose following max-pool is fused into its kernel call (truthy, so a
#: plan with only this fusion is still a plan; not ``True``: its output is a float map).
STEM_POOL = "stem_pool"
#: Plan entry of a conv block whose following 2x2 max-pool runs with it in row bands
#: (``ops.conv_pool``): the full-resolution map is never held, only one band and the pooled map.
CONV_POOL = "conv_pool"


def packed_maxpool(words: torch.Tensor, size: int, stride: int, padding: int) -> torch.Tensor:
    """Darknet max-pool on packed sign words ``(N, H, W, nw)``: ``sign(max(x)) = OR`` of the bits.

    Padded taps are ``-inf`` in Darknet (bit 0: never wins an OR); same output size as
    :func:`kd_bnn.models.darknet.model.darknet_maxpool`.
    """
    if padding:
        left = padding // 2
        right = padding - left
        words = F.pad(words.permute(0, 3, 1, 2), (left, right, left, right), value=0).permute(0, 2, 3, 1)
    h, w = words.shape[1], words.shape[2]
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    out = None
    for dy in range(size):
        for dx in range(size):
            tap = words[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            out = tap.clone() if out is None else out.bitwise_or_(tap)
    return out.contiguous()


def xnor_block(layer: nn.Module, ops: Any) -> nn.Module | None:
    """The packed XNOR conv of a Darknet block that maps sign(input) -> output with nothing after
    the kernel (BN folded, activation fused or linear), when the kernel path runs it."""
    if type(layer) is not DarknetConv or not ops.chainable_xnor(layer.conv):
        return None
    if not (layer.bn is None or isinstance(layer.bn, nn.Identity)) or not isinstance(layer.act, nn.Identity):
        return None
    return layer.conv


def _sign_preserving_float_block(layer: nn.Module, ops: Any) -> bool:
    if type(layer) is not DarknetConv or ops.is_packed_conv(layer.conv):
        return False
    act = layer.act
    return isinstance(act, nn.Identity) or (isinstance(act, nn.LeakyReLU) and act.negative_slope > 0)


def _even_pool2(layer: nn.Module) -> bool:
    """A Darknet size-2 stride-2 max-pool with padding 0 or 1: its windows start at even rows and
    columns, so it can run fused with the conv before it."""
    return isinstance(layer, MaxPool) and layer.size == 2 and layer.stride == 2 and layer.padding in (0, 1)


def stem_pool_fusable(layer: nn.Module, nxt: nn.Module, ops: Any) -> bool:
    """Whether Darknet conv block ``layer`` and the max-pool ``nxt`` after it run as one stem
    kernel call (``ops.stem_pool``): the runtime's stem conv with nothing after the kernel and a
    size-2 stride-2 pool with padding 0 or 1 (windows at even offsets)."""
    can = getattr(ops, "can_stem_pool", None)
    if type(layer) is not DarknetConv or can is None or not can(layer.conv):
        return False
    if not (layer.bn is None or isinstance(layer.bn, nn.Identity)) or not isinstance(layer.act, nn.Identity):
        return False
    return _even_pool2(nxt)


def conv_pool_fusable(layer: nn.Module, nxt: nn.Module, ops: Any) -> bool:
    """Whether Darknet conv block ``layer`` and the max-pool ``nxt`` after it run together in row
    bands (``ops.conv_pool``): a conv the runtime can band, a size-2 stride-2 pool with padding
    0 or 1 (windows at even rows)."""
    can = getattr(ops, "can_conv_pool", None)
    if type(layer) is not DarknetConv or can is None or not can(layer.conv):
        return False
    return _even_pool2(nxt)


class DarknetPlan(list):
    """Per layer: packed output (``True``), a fusion (:data:`STEM_POOL`, :data:`CONV_POOL`) or
    ``False``; ``int8`` maps the layers that write int8 activations to the scale they write in."""

    int8: dict[int, float]


def _w1a8_block(layer: nn.Module, ops: Any) -> float | None:
    """The input scale of a Darknet block whose conv runs W1A8 with nothing after the kernel (BN
    folded, activation fused), else None."""
    scale_of = getattr(ops, "w1a8_scale", None)
    if type(layer) is not DarknetConv or scale_of is None:
        return None
    if not (layer.bn is None or isinstance(layer.bn, nn.Identity)) or not isinstance(layer.act, nn.Identity):
        return None
    return scale_of(layer.conv)


def _int8_outputs(layers: list[nn.Module], consumers: list[list[int]], ops: Any) -> dict[int, float]:
    """Layers whose output may travel as int8: a W1A8 block or a max-pool (max commutes with the
    monotone quantizer) whose every consumer is a W1A8 block or such a max-pool, all reading the
    same scale; the value is that scale (the producer requantizes into it)."""
    target: dict[int, float] = {}
    for i in range(len(layers) - 1, -1, -1):
        scales = set()
        for c in consumers[i]:
            s = _w1a8_block(layers[c], ops)
            if s is None and isinstance(layers[c], MaxPool):
                s = target.get(c)
            scales.add(s)
        if consumers[i] and None not in scales and len(scales) == 1:
            target[i] = scales.pop()
    out: dict[int, float] = {}
    for i, layer in enumerate(layers):
        producer = _w1a8_block(layer, ops) is not None or (isinstance(layer, MaxPool) and i - 1 in out)
        if producer and i in target:
            out[i] = target[i]
    return out


def packed_plan(model: nn.Module, ops: Any) -> DarknetPlan:
    """Per Darknet layer: whether its output can travel as packed sign words (module docstring),
    or :data:`STEM_POOL` for a stem conv fused with the max-pool after it, or :data:`CONV_POOL` for
    a float-output conv block run in row bands with the max-pool after it."""
    layers = list(model.layers)
    n = len(layers)
    consumers: list[list[int]] = [[] for _ in range(n)]
    for k, layer in enumerate(layers):
        if isinstance(layer, (Route, Shortcut)):
            for j in layer.sources:
                consumers[j].append(k)
            if isinstance(layer, Shortcut) and k > 0:
                consumers[k - 1].append(k)
        elif k > 0:
            consumers[k - 1].append(k)
    packed = [False] * n
    for i in range(n - 1, -1, -1):
        layer = layers[i]
        producer = (xnor_block(layer, ops) is not None or isinstance(layer, MaxPool)
                    or _sign_preserving_float_block(layer, ops))
        if not producer or not consumers[i]:
            continue
        packed[i] = all(xnor_block(layers[c], ops) is not None or (isinstance(layers[c], MaxPool) and packed[c])
                        for c in consumers[i])
    plan = DarknetPlan(packed)
    for i in range(n - 1):
        if consumers[i] != [i + 1]:
            continue
        if stem_pool_fusable(layers[i], layers[i + 1], ops):
            plan[i] = STEM_POOL
        elif not plan[i] and not plan[i + 1] and conv_pool_fusable(layers[i], layers[i + 1], ops):
            plan[i] = CONV_POOL
    plan.int8 = _int8_outputs(layers, consumers, ops)
    return plan


def packed_forward(model: nn.Module, plan: list[bool | str], images: torch.Tensor, ops: Any) -> list[torch.Tensor]:
    """``DarknetDetector.forward`` with XNOR chains kept as packed bits between layers (and the
    stem conv + max-pool fusions of the plan)."""
    int8 = getattr(plan, "int8", {})

    def step(i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if plan[i] == STEM_POOL:
            return ops.stem_pool(layer.conv, x, model.layers[i + 1].padding)
        s8 = int8.get(i)
        if plan[i] == CONV_POOL:
            run = layer if s8 is None else (lambda xb: ops.w1a8(layer.conv, xb, s8))
            return ops.conv_pool(run, layer.conv, x, model.layers[i + 1].padding)
        if i > 0 and plan[i - 1] in (STEM_POOL, CONV_POOL):  # the pool ran with the conv: x is its output
            return ops.pack(x) if plan[i] is True else x
        if isinstance(layer, MaxPool) and plan[i]:
            if not ops.is_packed(x):
                x = ops.pack(x)
            return packed_maxpool(x, layer.size, layer.stride, layer.padding)
        if (c := xnor_block(layer, ops)) is not None and (plan[i] or ops.is_packed(x)):
            return ops.xnor(c, x, packed_out=plan[i])
        if plan[i] and _sign_preserving_float_block(layer, ops):
            y = layer.conv(x)
            return ops.pack(y if layer.bn is None else layer.bn(y))
        if s8 is not None and not isinstance(layer, MaxPool):
            return ops.w1a8(layer.conv, x, s8)
        return layer(x)

    return model.run_graph(images, step)
