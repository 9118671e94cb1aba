"""`DarknetDetector`: a Darknet cfg built as a PyTorch module graph, with Darknet's numerics.

Each cfg section becomes one module of ``model.layers`` (index = Darknet layer index), each
module mirrors the forward pass of the Darknet layer of the same name (pjreddie/darknet
``src/*_layer.c``), including where Darknet differs from the obvious PyTorch op: the padding of
``[maxpool]`` and the channel order of ``[reorg]``. In eval mode ``model(x)`` returns the raw
head maps, one NCHW tensor per ``[region]``/``[yolo]`` section (the output of the layer feeding
it), equal to OpenCV's Darknet importer on the same files: on random weights the largest
difference on the shipped cfgs is 5e-6 of the map's range (OpenCV 4.14,
``tests/test_models_darknet_opencv.py``).

Heads (decode, loss, NMS) come from :mod:`kd_bnn.models.heads`: ``[region]`` -> ``RegionHead``
(YOLOv2, anchors in grid cells), ``[yolo]`` -> ``YoloHead`` (YOLOv3, anchors in pixels).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.io import atomic_write_text
from kd_bnn.models.darknet.cfg import CfgError, Section, format_cfg, parse_cfg, parse_cfg_text
from kd_bnn.models.darknet.weights import (
    LayerBlobs,
    WeightsHeader,
    read_weights,
    write_weights,
)
from kd_bnn.models.detector import (
    DETECTORS,
    ClassCountError,
    Detections,
    Detector,
    register_skeleton,
)
from kd_bnn.models.heads import AnchorHeadsMixin, RegionHead, YoloHead, heads_loss, predict_heads
from kd_bnn.models.state_dict import load_state_dict_file

__all__ = [
    "BN_EPS", "DarknetConv", "DarknetDetector", "DetectionLayer", "GlobalAvgPool", "MaxPool",
    "Reorg", "Route", "Shortcut", "Upsample", "Dropout", "darknet", "darknet_maxpool",
    "darknet_reorg", "load_darknet", "make_activation", "save_darknet",
]

#: BatchNorm epsilon. Darknet divides by ``sqrt(var) + 1e-6`` (pjreddie ``normalize_cpu``) or by
#: ``sqrt(var + 1e-5)`` (AlexeyAB); OpenCV's Darknet importer uses ``sqrt(var + 1e-6)``, which we
#: match. They differ by under 1e-5 relative for any variance above 0.01.
BN_EPS = 1e-6

#: Darknet's leaky ReLU slope (``activations.h``: ``x > 0 ? x : .1*x``).
LEAKY_SLOPE = 0.1


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

def make_activation(name: str) -> nn.Module:
    """The module for a Darknet activation name (see ``cfg.ACTIVATIONS``)."""
    table = {
        "linear": nn.Identity, "leaky": lambda: nn.LeakyReLU(LEAKY_SLOPE), "relu": nn.ReLU,
        "logistic": nn.Sigmoid, "mish": nn.Mish, "swish": nn.SiLU,
    }
    if name not in table:
        raise ValueError(f"unknown Darknet activation {name!r}; expected one of {', '.join(table)}")
    return table[name]()


class DarknetConv(nn.Module):
    """``[convolutional]``: conv (with bias only without BN) -> optional BatchNorm -> activation.

    Attributes:
        conv: the ``nn.Conv2d`` (``bias=False`` when ``batch_normalize=1``).
        bn: the ``nn.BatchNorm2d`` (eps :data:`BN_EPS`) or ``None``.
        act: the activation module; ``activation`` its Darknet name.
        binary, xnor: the cfg's ``binary=1`` / ``xnor=1`` flags, recorded but not applied here
            (the float model is the teacher; ``kd_bnn.binary`` binarizes).
    """

    def __init__(self, in_channels: int, filters: int, size: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, batch_normalize: bool = False,
                 activation: str = "leaky", binary: bool = False, xnor: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, filters, size, stride, padding, groups=groups,
                              bias=not batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=BN_EPS) if batch_normalize else None
        self.act = make_activation(activation)
        self.activation = activation
        self.binary = bool(binary)
        self.xnor = bool(xnor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    def darknet_blobs(self) -> list[tuple[str, torch.Tensor]]:
        """Parameter tensors in ``.weights`` order (Darknet ``load_convolutional_weights``):
        BN bias, scale, rolling mean, rolling variance (or the conv bias), then the weights."""
        if self.bn is not None:
            head = [("bn.bias", self.bn.bias), ("bn.weight", self.bn.weight),
                    ("bn.running_mean", self.bn.running_mean),
                    ("bn.running_var", self.bn.running_var)]
        else:
            head = [("conv.bias", self.conv.bias)]
        return head + [("conv.weight", self.conv.weight)]


def darknet_maxpool(x: torch.Tensor, size: int, stride: int, padding: int) -> torch.Tensor:
    """Darknet ``forward_maxpool_layer``: windows start at ``-(padding // 2)``, taps outside the
    map count as ``-inf``, and the output size is ``(W + padding - size) // stride + 1``. With the
    default ``padding = size - 1`` a size-2 stride-2 pool on an odd W gives ``(W + 1) // 2``, and a
    size-2 stride-1 pool keeps W (one -inf column on the right)."""
    left = padding // 2
    n, c, h, w = x.shape
    if size == stride == 2 and left == 0:
        # the same maxima as F.max_pool2d, 5-13x faster on CPU: the 2x2 windows tile rows and
        # columns [0, 2*out); crop what no window reads, pad -inf where the last window overhangs,
        # then a maximum of row pairs and one of column pairs (two strided views each)
        oh, ow = (h + padding - 2) // 2 + 1, (w + padding - 2) // 2 + 1
        x = x[:, :, :2 * oh, :2 * ow]
        if 2 * oh > h or 2 * ow > w:
            x = F.pad(x, (0, 2 * ow - x.shape[3], 0, 2 * oh - x.shape[2]), value=_lowest(x.dtype))
        rows = x.contiguous().view(n, c, oh, 4 * ow)
        r = torch.maximum(rows[..., :2 * ow], rows[..., 2 * ow:]).view(n, c, oh, ow, 2)
        return torch.maximum(r[..., 0], r[..., 1])
    if padding:
        x = F.pad(x, (left, padding - left, left, padding - left), value=_lowest(x.dtype))
    if not x.dtype.is_floating_point:  # int8 activations (W1A8 runtime): max_pool2d is float-only
        return F.max_pool2d(x.float(), size, stride).to(x.dtype)
    return F.max_pool2d(x, size, stride)


def _lowest(dtype: torch.dtype) -> float:
    """The padding that never wins a max: -inf, or the integer type's minimum."""
    return float("-inf") if dtype.is_floating_point else float(torch.iinfo(dtype).min)


class MaxPool(nn.Module):
    """``[maxpool]`` with Darknet's padding (see :func:`darknet_maxpool`)."""

    def __init__(self, size: int, stride: int, padding: int):
        super().__init__()
        self.size, self.stride, self.padding = size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return darknet_maxpool(x, self.size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"size={self.size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool(nn.Module):
    """``[avgpool]``: mean over the whole map, (B, C, H, W) -> (B, C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class Route(nn.Module):
    """``[route]``: concatenate earlier outputs along channels; with ``groups=g`` take the
    ``group_id``-th of g equal channel slices of each input first (AlexeyAB ``route_layer.c``).

    ``sources`` holds absolute layer indices (negative cfg indices resolved).
    """

    def __init__(self, sources: Sequence[int], groups: int = 1, group_id: int = 0):
        super().__init__()
        self.sources = list(sources)
        self.groups, self.group_id = groups, group_id

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.groups > 1:
            inputs = [t.chunk(self.groups, dim=1)[self.group_id] for t in inputs]
        return inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)

    def extra_repr(self) -> str:
        return f"sources={self.sources}, groups={self.groups}, group_id={self.group_id}"


def darknet_reorg(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Darknet's ``[reorg]`` (YOLOv2 passthrough), (B, C, H, W) -> (B, C*s*s, H/s, W/s).

    pjreddie/darknet ``forward_reorg_layer`` calls ``reorg_cpu(input, w, h, c, batch, stride,
    forward=0, output)`` with the *input's* w, h, c, and OpenCV's Darknet importer copies that
    loop. It reads the input buffer as if it were (C/s², H*s, W*s) and fills the output buffer
    as (C, H, W)::

        out[k, j, i] = in_as(C/s², H*s, W*s)[k % (C/s²), j*s + o // s, i*s + o % s],
        o = k // (C/s²)

    and the next layer reads that buffer as (C*s², H/s, W/s). This is *not* the usual
    space-to-depth (``pixel_unshuffle``); trained YOLOv2 weights depend on it. AlexeyAB's fork
    passes the output sizes instead, which gives a plain space-to-depth with channel ``o*C + c``;
    we follow pjreddie and OpenCV.
    """
    b, c, h, w = x.shape
    s = stride
    if c % (s * s) or h % s or w % s:
        raise ValueError(f"reorg stride {s}: channels ({c}) must be divisible by {s * s}, height "
                         f"({h}) and width ({w}) by {s}")
    cs = c // (s * s)
    y = x.reshape(b, cs, h, s, w, s).permute(0, 3, 5, 1, 2, 4)  # (b, dy, dx, c', j, i)
    return y.reshape(b, c * s * s, h // s, w // s)


class Reorg(nn.Module):
    """``[reorg]`` with Darknet's channel order (see :func:`darknet_reorg`)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return darknet_reorg(x, self.stride)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class Shortcut(nn.Module):
    """``[shortcut]``: ``act(previous + layers[from])``; with different channel counts only the
    first ``min(C1, C2)`` channels are added, as Darknet's ``shortcut_cpu`` does."""

    def __init__(self, source: int, activation: str = "linear"):
        super().__init__()
        self.sources = [source]
        self.act = make_activation(activation)
        self.activation = activation

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == other.shape[1]:
            return self.act(x + other)
        n = min(x.shape[1], other.shape[1])
        return self.act(torch.cat([x[:, :n] + other[:, :n], x[:, n:]], dim=1))


class Upsample(nn.Module):
    """``[upsample]``: nearest neighbour by ``stride``, times ``scale`` (Darknet ``upsample_cpu``)."""

    def __init__(self, stride: int = 2, scale: float = 1.0):
        super().__init__()
        self.stride, self.scale = stride, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return y * self.scale if self.scale != 1.0 else y

    def extra_repr(self) -> str:
        return f"stride={self.stride}, scale={self.scale}"


class Dropout(nn.Dropout):
    """``[dropout]``: identity in eval; in training zeroes with ``probability`` and rescales."""


class DetectionLayer(nn.Module):
    """``[region]`` / ``[yolo]`` in the layer list: passes its input (the raw head map) through.

    Attributes:
        kind: ``"region"`` or ``"yolo"``; head_index: its index in ``DarknetDetector.heads``.
    """

    def __init__(self, kind: str, head_index: int):
        super().__init__()
        self.kind, self.head_index = kind, head_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, head={self.head_index}"


class DarknetClassCountError(ClassCountError, CfgError):
    """A cfg whose ``classes`` differs from the number of class names given (a `CfgError` too)."""


# --------------------------------------------------------------------------------------------
# Building the graph
# --------------------------------------------------------------------------------------------

def _multiple_hint(value: int, stride: int) -> str:
    lo = max(stride, value // stride * stride)
    hi = (value // stride + 1) * stride
    return f"{lo} or {hi}" if lo != hi else str(lo)


def _resolve(sec: Section, key: str, idx: int, ref: int) -> int:
    """Absolute index of a route/shortcut reference (negative = relative to this layer)."""
    j = idx + ref if ref < 0 else ref
    if not 0 <= j < idx:
        raise sec.error(f"key {key!r}: layer {ref} resolves to {j}, expected an earlier layer "
                        f"(0..{idx - 1})", key)
    return j


class DarknetDetector(AnchorHeadsMixin, Detector):
    """A Darknet cfg as an ``nn.Module`` graph meeting the :class:`Detector` interface.

    Attributes:
        layers: one module per cfg section after ``[net]`` (index = Darknet layer index).
        heads: one :class:`RegionHead` / :class:`YoloHead` per ``[region]`` / ``[yolo]``.
        head_layers: index of each head section in ``layers``.
        sections: the parsed cfg (``[net]`` first); ``weights_header`` the ``.weights`` header.
        input_size, class_names, taps: see :class:`Detector`.
        stride: the largest downsampling factor of the network; input sizes are multiples of it.
    """

    def __init__(self, sections: list[Section], class_names: Sequence[str] | None = None,
                 input_size: tuple[int, int] | None = None):
        super().__init__()
        sections = copy.deepcopy(sections)
        net = sections[0]
        if net.type != "net":
            raise CfgError(f"{net.where()}: the first section must be [net], found [{net.type}]")
        cfg_h, cfg_w = net.get_int("height"), net.get_int("width")
        in_h, in_w = (int(input_size[0]), int(input_size[1])) if input_size else (cfg_h, cfg_w)
        net.options["height"], net.options["width"] = str(in_h), str(in_w)
        self.sections = sections
        self.weights_header = WeightsHeader()
        self.layers = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.head_layers: list[int] = []
        self._strides: list[Fraction | None] = []
        self._build(sections, in_h, in_w)
        self.input_size = (in_h, in_w)
        num_classes = self._head_classes()
        if class_names is None:
            class_names = [f"class{i}" for i in range(num_classes)]
        class_names = [str(n) for n in class_names]
        if len(class_names) != num_classes:
            sec = sections[1 + self.head_layers[0]]
            raise DarknetClassCountError(
                f"{sec.where('classes')}: the cfg has classes={num_classes} but {len(class_names)} class "
                f"names were given ({', '.join(class_names[:12])}{', ...' if len(class_names) > 12 else ''})",
                model_classes=num_classes, given=len(class_names))
        self.class_names = class_names
        self.taps = self._choose_taps()

    # -- construction ------------------------------------------------------------------------
    def _build(self, sections: list[Section], in_h: int, in_w: int) -> None:
        net = sections[0]
        channels = net.get_int("channels", 3)
        # The network stride (for the input-size check) comes from the layer types alone.
        strides: list[Fraction | None] = []
        for idx, sec in enumerate(sections[1:]):
            prev = strides[-1] if strides else Fraction(1)
            if sec.type == "convolutional":
                s = prev * sec.get_int("stride", 1) if prev is not None else None
            elif sec.type == "maxpool":
                s = prev * sec.get_int("stride", 1) if prev is not None else None
            elif sec.type == "reorg":
                s = prev * sec.get_int("stride", 1) if prev is not None else None
            elif sec.type == "upsample":
                s = prev / sec.get_int("stride", 2) if prev is not None else None
            elif sec.type == "avgpool":
                s = None
            elif sec.type == "route":
                refs = [_resolve(sec, "layers", idx, r) for r in sec.get_ints("layers")]
                s = strides[refs[0]]
            else:
                s = prev
            strides.append(s)
        self._strides = strides
        max_stride = max((s for s in strides if s is not None), default=Fraction(1))
        self.stride = int(max_stride) if max_stride.denominator == 1 else 1
        for name, value in (("height", in_h), ("width", in_w)):
            if value <= 0 or value % self.stride:
                raise CfgError(
                    f"{net.where(name)}: input {name} {value} is not a multiple of the network "
                    f"stride {self.stride}; valid {name}s are multiples of {self.stride} "
                    f"(e.g. {_multiple_hint(max(value, 1), self.stride)})")

        shapes: list[tuple[int, int, int]] = []  # (C, H, W) per layer
        for idx, sec in enumerate(sections[1:]):
            c, h, w = shapes[-1] if shapes else (channels, in_h, in_w)
            module, shape = self._make_layer(idx, sec, c, h, w, shapes)
            self.layers.append(module)
            shapes.append(shape)
        self._shapes = shapes
        if not self.head_layers:
            raise CfgError(f"{net.source}: the cfg has no [region] or [yolo] layer")
        self._keep = sorted({j for m in self.layers if isinstance(m, (Route, Shortcut))
                             for j in m.sources})

    def _make_layer(self, idx: int, sec: Section, c: int, h: int, w: int,
                    shapes: list[tuple[int, int, int]]) -> tuple[nn.Module, tuple[int, int, int]]:
        t = sec.type
        if h <= 0 or w <= 0:
            raise sec.error(f"layer {idx} receives an empty {h}x{w} map; the input is too small")
        if t == "convolutional":
            filters = sec.get_int("filters", 1)
            size = sec.get_int("size", 1)
            stride = sec.get_int("stride", 1)
            groups = sec.get_int("groups", 1)
            pad = size // 2 if sec.get_int("pad", 0) else sec.get_int("padding", 0)
            if c % groups or filters % groups:
                raise sec.error(f"groups={groups} must divide the input channels ({c}) and "
                                f"filters ({filters})", "groups")
            module = DarknetConv(c, filters, size, stride, pad, groups,
                                 bool(sec.get_int("batch_normalize", 0)),
                                 sec.get_str("activation", "logistic"),
                                 binary=bool(sec.get_int("binary", 0)),
                                 xnor=bool(sec.get_int("xnor", 0)))
            oh = (h + 2 * pad - size) // stride + 1
            ow = (w + 2 * pad - size) // stride + 1
            return module, (filters, oh, ow)
        if t == "maxpool":
            stride = sec.get_int("stride", 1)
            size = sec.get_int("size", stride)
            padding = sec.get_int("padding", size - 1)
            return MaxPool(size, stride, padding), (c, (h + padding - size) // stride + 1,
                                                    (w + padding - size) // stride + 1)
        if t == "avgpool":
            return GlobalAvgPool(), (c, 1, 1)
        if t == "dropout":
            p = sec.get_float("probability", 0.5)
            if not 0.0 <= p < 1.0:
                raise sec.error(f"key 'probability' must be in [0, 1), found {p}", "probability")
            return Dropout(p), (c, h, w)
        if t == "upsample":
            stride = sec.get_int("stride", 2)
            return Upsample(stride, sec.get_float("scale", 1.0)), (c, h * stride, w * stride)
        if t == "reorg":
            if sec.get_int("reverse", 0):
                raise sec.error("reverse=1 is not supported (only the YOLOv2 passthrough)",
                                "reverse")
            s = sec.get_int("stride", 1)
            if s <= 0 or c % (s * s) or h % s or w % s:
                raise sec.error(f"stride {s} needs channels divisible by {s * s} and the map "
                                f"divisible by {s}, found {c}x{h}x{w}", "stride")
            return Reorg(s), (c * s * s, h // s, w // s)
        if t == "route":
            refs = [_resolve(sec, "layers", idx, r) for r in sec.get_ints("layers")]
            groups = sec.get_int("groups", 1)
            group_id = sec.get_int("group_id", 0)
            if not 0 <= group_id < groups:
                raise sec.error(f"group_id must be in [0, {groups - 1}], found {group_id}",
                                "group_id")
            src = [shapes[j] for j in refs]
            if len({(s[1], s[2]) for s in src}) != 1:
                desc = ", ".join(f"layer {j}: {s[1]}x{s[2]}" for j, s in zip(refs, src))
                raise sec.error(f"route inputs differ in size ({desc})", "layers")
            if any(s[0] % groups for s in src):
                raise sec.error(f"groups={groups} must divide the channels of every input "
                                f"({[s[0] for s in src]})", "groups")
            out_c = sum(s[0] // groups for s in src)
            return Route(refs, groups, group_id), (out_c, src[0][1], src[0][2])
        if t == "shortcut":
            j = _resolve(sec, "from", idx, sec.get_int("from"))
            if shapes[j][1:] != (h, w):
                raise sec.error(f"shortcut adds layer {j} ({shapes[j][1]}x{shapes[j][2]}) to a "
                                f"{h}x{w} map; sizes must match", "from")
            return Shortcut(j, sec.get_str("activation", "linear")), (c, h, w)
        if t in ("region", "yolo"):
            return self._make_head(idx, sec, c, h, w)
        raise sec.error(f"section [{t}] is not supported inside a network")

    def _make_head(self, idx: int, sec: Section, c: int, h: int, w: int
                   ) -> tuple[nn.Module, tuple[int, int, int]]:
        if idx == 0 or not isinstance(self.layers[idx - 1], DarknetConv):
            raise sec.error("must follow the [convolutional] layer that predicts its map")
        classes = sec.get_int("classes")
        anchors = sec.get_floats("anchors")
        if len(anchors) % 2:
            raise sec.error(f"anchors: expected (w, h) pairs, found {len(anchors)} numbers",
                            "anchors")
        pairs = [anchors[i:i + 2] for i in range(0, len(anchors), 2)]
        stride = self._strides[idx]
        if stride is None or stride.denominator != 1:
            raise sec.error(f"the head map has no integer stride ({stride})")
        stride = int(stride)
        if sec.type == "region":
            num = sec.get_int("num", len(pairs))
            if sec.get_int("coords", 4) != 4:
                raise sec.error(f"only coords=4 is supported, found {sec.get_int('coords')}",
                                "coords")
            if num != len(pairs):
                raise sec.error(f"num={num} but {len(pairs)} anchor pairs are given", "num")
            head = RegionHead(pairs, classes, stride,
                              coord_scale=sec.get_float("coord_scale", 1.0),
                              object_scale=sec.get_float("object_scale", 5.0),
                              noobject_scale=sec.get_float("noobject_scale", 1.0),
                              class_scale=sec.get_float("class_scale", 1.0),
                              ignore_thresh=sec.get_float("thresh", 0.6),
                              rescore=bool(sec.get_int("rescore", 1)))
            n_anchor = num
        else:
            num = sec.get_int("num", len(pairs))
            if num != len(pairs):
                raise sec.error(f"num={num} but {len(pairs)} anchor pairs are given", "num")
            mask = sec.get_ints("mask", list(range(num)))
            if any(not 0 <= m < num for m in mask):
                raise sec.error(f"mask {mask} indexes outside the {num} anchors", "mask")
            head = YoloHead(pairs, mask, classes, stride,
                            ignore_thresh=sec.get_float("ignore_thresh", 0.7))
            n_anchor = len(mask)
        need = n_anchor * (5 + classes)
        if c != need:
            prev = self.sections[idx]  # the conv section (sections[0] is [net])
            raise CfgError(
                f"{prev.where('filters')}: [convolutional] before the [{sec.type}] at line "
                f"{sec.line} has filters={c}, the head needs {n_anchor} anchors x (5 + {classes} "
                f"classes) = {need}")
        self.head_layers.append(idx)
        self.heads.append(head)
        return DetectionLayer(sec.type, len(self.heads) - 1), (c, h, w)

    def _head_classes(self) -> int:
        counts = {int(h.num_classes) for h in self.heads}
        if len(counts) != 1:
            sec = self.sections[1 + self.head_layers[-1]]
            raise sec.error(f"heads disagree on the number of classes: {sorted(counts)}",
                            "classes")
        return counts.pop()

    def _choose_taps(self) -> dict[str, str]:
        """``strideN``: the last conv at each stride >= 8 before the first route/shortcut/head
        (the backbone); ``head_in`` (``head_in1``, ...): the conv feeding each prediction conv."""
        taps: dict[str, str] = {}
        pred = {i - 1 for i in self.head_layers}
        for i, m in enumerate(self.layers):
            if isinstance(m, (Route, Shortcut, DetectionLayer)):
                break
            s = self._strides[i]
            if isinstance(m, DarknetConv) and i not in pred and s is not None \
                    and s.denominator == 1 and s >= 8:
                taps[f"stride{int(s)}"] = f"layers.{i}"
        for k, hl in enumerate(self.head_layers):
            src = hl - 2  # the layer whose output feeds the prediction conv
            if src >= 0 and isinstance(self.layers[src], DarknetConv):
                taps["head_in" if k == 0 else f"head_in{k}"] = f"layers.{src}"
        return taps

    # -- introspection -----------------------------------------------------------------------
    def anchor_heads(self) -> list:
        return list(self.heads)

    def prediction_convs(self) -> list[str]:
        """Module paths of the ``nn.Conv2d`` that predict each head's raw map (keep them float)."""
        return [f"layers.{i - 1}.conv" for i in self.head_layers]

    def conv_layers(self) -> list[tuple[int, DarknetConv]]:
        """(layer index, module) of every ``[convolutional]`` layer, in weights-file order."""
        return [(i, m) for i, m in enumerate(self.layers) if isinstance(m, DarknetConv)]

    def binary_flags(self) -> dict[str, str]:
        """Module paths of the convs marked ``xnor=1`` or ``binary=1`` in the cfg."""
        return {f"layers.{i}.conv": ("xnor" if m.xnor else "binary")
                for i, m in self.conv_layers() if m.xnor or m.binary}

    def layer_label(self, idx: int) -> str:
        sec = self.sections[idx + 1]
        return f"layer {idx} ([{sec.type}] at {sec.where()})"

    def output_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each layer's output at ``input_size``."""
        return list(self._shapes)

    # -- Detector interface ------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the graph; returns one raw map (B, A*(5+C), H, W) per head, in cfg order."""
        return self.run_graph(images)

    def run_graph(self, images: torch.Tensor,
                  step: Callable[[int, nn.Module, torch.Tensor], torch.Tensor] | None = None
                  ) -> list[torch.Tensor]:
        """The cfg's routing (``[route]``, ``[shortcut]``, kept outputs, head maps) with each other
        layer run as ``step(i, layer, x)`` (default ``layer(x)``): the packed runtime supplies its
        own step and reuses the routing."""
        keep = self._keep
        cache: dict[int, torch.Tensor] = {}
        raws: list[torch.Tensor] = []
        x = images
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Route):
                x = layer([x if j == i - 1 else cache[j] for j in layer.sources])
            elif isinstance(layer, Shortcut):
                j = layer.sources[0]
                x = layer(x, x if j == i - 1 else cache[j])
            else:
                x = layer(x) if step is None else step(i, layer, x)
                if isinstance(layer, DetectionLayer):
                    raws.append(x)
            if i in keep:
                cache[i] = x
        return raws

    def loss(self, raw: Sequence[torch.Tensor], targets: torch.Tensor,
             ignore: list[torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the heads' losses; parts ``box``, ``obj``, ``cls`` summed over heads."""
        return heads_loss(list(self.heads), list(raw), targets, ignore,
                          self._input_size_of(raw))

    def predict(self, raw: Sequence[torch.Tensor], conf_thres: float = 0.005,
                iou_thres: float = 0.45, max_det: int = 300) -> list[Detections]:
        """Decode every head, merge the predictions of all heads, then class-wise NMS."""
        return predict_heads(list(self.heads), list(raw), self._input_size_of(raw),
                             conf_thres, iou_thres, max_det)

    def _input_size_of(self, raw: Sequence[torch.Tensor]) -> tuple[int, int]:
        """The input size the maps came from (the model runs on any multiple of the stride)."""
        if len(raw) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} raw maps (one per head), found {len(raw)}")
        h, w = raw[0].shape[-2:]
        s = self.heads[0].stride
        return int(h) * s, int(w) * s

    # -- weights -----------------------------------------------------------------------------
    def weight_layout(self) -> list[LayerBlobs]:
        """What the ``.weights`` file holds for this cfg, layer by layer."""
        return [LayerBlobs(self.layer_label(i), [(n, t.numel()) for n, t in m.darknet_blobs()])
                for i, m in self.conv_layers()]

    def load_weights(self, path: str | os.PathLike) -> WeightsHeader:
        """Load a Darknet ``.weights`` file (see :mod:`kd_bnn.models.darknet.weights`)."""
        header, blobs = read_weights(path, self.weight_layout())
        with torch.no_grad():
            for (_, m), arrays in zip(self.conv_layers(), blobs):
                for name, tensor in m.darknet_blobs():
                    tensor.copy_(torch.from_numpy(arrays[name]).view_as(tensor))
        self.weights_header = header
        return header

    def save_weights(self, path: str | os.PathLike) -> None:
        """Write a Darknet ``.weights`` file (header version 0.2, int64 ``seen``) atomically."""
        layers = []
        for _, m in self.conv_layers():
            layers.append({n: t.detach().cpu().float().numpy().ravel()
                           for n, t in m.darknet_blobs()})
        header = self.weights_header
        if not header.seen_is_int64:
            header = WeightsHeader(0, 2, 0, header.seen)
        write_weights(path, header, layers)

    def with_classes(self, class_names: Sequence[str], sources: Sequence[int | None]) -> DarknetDetector:
        """Head transfer (:meth:`Detector.with_classes`): the same cfg with ``classes`` of every
        ``[yolo]`` / ``[region]`` set to ``len(class_names)`` and the ``filters`` of the conv
        before it to ``anchors x (5 + classes)``; every other layer's weights copied. In each
        prediction conv, per anchor, the 4 box rows and the objectness row are copied, class row
        ``j`` comes from this model's class ``sources[j]``; a class with no source starts with zero
        weights and the mean class bias of that anchor (a prior that is neither confident nor
        silent). For a ``[yolo]`` head (independent sigmoids) the new model's score of class ``j``
        equals this model's score of class ``sources[j]`` exactly."""
        names = [str(n) for n in class_names]
        srcs = _check_sources(names, sources, self.num_classes)
        c_new, c_old = len(names), self.num_classes
        sections = copy.deepcopy(self.sections)
        for hl, head in zip(self.head_layers, self.heads):
            sections[1 + hl].options["classes"] = str(c_new)
            sections[hl].options["filters"] = str(head.num_anchors * (5 + c_new))  # the conv at layer hl - 1
        new = DarknetDetector(sections, class_names=names, input_size=self.input_size)
        pred = {hl - 1 for hl in self.head_layers}
        old_sd = self.state_dict()
        state = {}
        for key in new.state_dict():
            if int(key.split(".")[1]) not in pred:
                state[key] = old_sd[key]
        new.load_state_dict(state, strict=False)
        with torch.no_grad():
            for hl, head in zip(self.head_layers, self.heads):
                a_n = head.num_anchors
                rows: list[int | None] = []
                for a in range(a_n):
                    rows += [a * (5 + c_old) + k for k in range(5)]
                    rows += [None if s is None else a * (5 + c_old) + 5 + s for s in srcs]
                class_rows = [[a * (5 + c_old) + 5 + k for k in range(c_old)] for a in range(a_n)]
                fresh_bias = [a for a in range(a_n) for _ in range(5 + c_new)]
                _copy_rows(self.layers[hl - 1], new.layers[hl - 1], rows, class_rows, fresh_bias)
        new.weights_header = self.weights_header
        p = next(self.parameters(), None)
        if p is not None:
            new.to(p.device)
        return new.train(self.training)

    def cfg_text(self) -> str:
        """The cfg of this model (``[net]`` width/height = ``input_size``)."""
        return format_cfg(self.sections)

    def activation_blocks(self) -> list[tuple[str, str | None, str]]:
        """Every ``[convolutional]`` block: ``act(bn(conv(x)))``."""
        return [(f"layers.{i}.conv", f"layers.{i}.bn" if m.bn is not None else None, f"layers.{i}.act")
                for i, m in self.conv_layers()]

    def packed_plan(self, ops) -> list[bool] | None:
        """Darknet layers that may pass packed sign words (:mod:`kd_bnn.models.darknet.packed`)."""
        from kd_bnn.models.darknet.packed import packed_plan

        plan = packed_plan(self, ops)
        return plan if any(plan) else None

    def packed_forward(self, images: torch.Tensor, plan, ops) -> list[torch.Tensor]:
        from kd_bnn.models.darknet.packed import packed_forward

        return packed_forward(self, plan, images, ops)

    def skeleton(self) -> dict[str, Any]:
        """A Darknet model is rebuilt from its own cfg text (no file is named)."""
        return {"family": "darknet", "options": {"cfg_text": self.cfg_text()}}


def _check_sources(names: list[str], sources: Sequence[int | None], num_old: int) -> list[int | None]:
    if not names:
        raise ValueError("with_classes: expected at least one class name")
    if len(sources) != len(names):
        raise ValueError(f"with_classes: {len(names)} class names but {len(sources)} sources")
    out: list[int | None] = []
    for name, s in zip(names, sources):
        if s is not None and not (isinstance(s, int) and 0 <= s < num_old):
            raise ValueError(f"with_classes: source of class {name!r} must be None or a class index in "
                             f"[0, {num_old - 1}], found {s!r}")
        out.append(s)
    return out


def _copy_rows(old: DarknetConv, new: DarknetConv, rows: list[int | None], class_rows: list[list[int]],
               fresh_anchor: list[int]) -> None:
    """Row ``r`` of every per-output-channel tensor of ``new`` (conv weight / bias, BN vectors)
    from row ``rows[r]`` of ``old``; a None row: zero weights, BN identity, and as bias the mean
    of ``old``'s class biases of anchor ``fresh_anchor[r]``."""
    idx = torch.tensor([-1 if r is None else r for r in rows])
    have = idx >= 0
    w = torch.zeros_like(new.conv.weight)
    w[have] = old.conv.weight.detach()[idx[have]].to(w)
    new.conv.weight.copy_(w)
    if new.conv.bias is not None:
        ob = old.conv.bias.detach()
        prior = torch.stack([ob[r].mean() for r in class_rows])
        b = prior[torch.tensor(fresh_anchor)].to(ob)
        b[have] = ob[idx[have]]
        new.conv.bias.copy_(b)
    if new.bn is not None and old.bn is not None:
        for name, fresh in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            src = getattr(old.bn, name).detach()
            v = torch.full_like(getattr(new.bn, name), fresh)
            v[have] = src[idx[have]].to(v)
            getattr(new.bn, name).copy_(v)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def load_darknet(cfg_path: str | os.PathLike, weights_path: str | os.PathLike | None = None,
                 class_names: Sequence[str] | None = None,
                 input_size: tuple[int, int] | None = None) -> DarknetDetector:
    """Build a :class:`DarknetDetector` from a cfg file, optionally loading ``.weights``.

    Args:
        cfg_path: Darknet ``.cfg``.
        weights_path: Darknet ``.weights`` matching the cfg, or None for PyTorch's init.
        class_names: names in label order; their count must equal the cfg's ``classes``.
        input_size: (height, width) overriding the cfg's; multiples of the network stride.
    """
    model = DarknetDetector(parse_cfg(cfg_path), class_names=class_names, input_size=input_size)
    if weights_path is not None:
        model.load_weights(weights_path)
    return model


def save_darknet(model: DarknetDetector, path: str | os.PathLike,
                 cfg_path: str | os.PathLike | None = None) -> None:
    """Write ``model`` as a Darknet ``.weights`` file (and its cfg when ``cfg_path`` is given),
    readable by :func:`load_darknet`, Darknet and OpenCV."""
    if not isinstance(model, DarknetDetector):
        raise TypeError(f"save_darknet needs a DarknetDetector, found {type(model).__name__}")
    model.save_weights(path)
    if cfg_path is not None:
        atomic_write_text(cfg_path, model.cfg_text())


def _resolve_cfg(cfg: str | os.PathLike) -> Path:
    """A cfg path, or a cfg shipped in the package (``kd_bnn/configs/darknet/``) named by its name
    (``"yolov2-kitti"``) or by a path that does not exist here but ends in a shipped cfg's file name
    (the shipped configs write ``configs/darknet/yolov2-demo.cfg``, which a pip install has no
    ``configs/`` folder for)."""
    p = Path(cfg)
    if p.is_file():
        return p
    shipped = Path(__file__).resolve().parents[2] / "configs" / "darknet"
    for cand in (shipped / str(cfg), shipped / f"{cfg}.cfg", shipped / p.name):
        if cand.is_file():
            return cand
    names = sorted(q.stem for q in shipped.glob("*.cfg")) if shipped.is_dir() else []
    raise FileNotFoundError(f"Darknet cfg {cfg!s} not found (neither a file nor a shipped cfg; "
                            f"shipped: {', '.join(names) or 'none'})")


def _load_state_dict(model: DarknetDetector, path: Path) -> None:
    """Load a kd_bnn state dict (safetensors, or a torch file read with ``weights_only=True``)."""
    state = load_state_dict_file(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: state dict does not match this Darknet cfg: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


@DETECTORS.register("darknet")
def darknet(cfg: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
            class_names: Sequence[str] | None = None,
            input_size: Sequence[int] | None = None, trust: bool = False,
            **options) -> DarknetDetector:
    """Detector factory ``model.family: darknet``.

    Args:
        cfg: a cfg path or the name of a shipped cfg (``"yolov2-kitti"``, ``"yolov2-demo"``...).
        weights: Darknet ``.weights``, or a kd_bnn state dict (``.safetensors`` / torch file,
            read with ``weights_only=True``).
        class_names: names in label order; their count must equal the cfg's ``classes``.
        input_size: (height, width), multiples of the network stride; default the cfg's.
        trust: accepted for a uniform factory signature; nothing here unpickles code.
    """
    del trust  # Darknet weights are raw floats; state dicts load with weights_only=True
    if options:
        raise TypeError(f"model.options: the darknet family takes no options, found "
                        f"{sorted(options)}; the architecture comes from the cfg")
    if cfg is None:
        raise ValueError("model.cfg: the darknet family needs a Darknet .cfg (a path or a shipped "
                         "name such as 'yolov2-kitti')")
    size = (int(input_size[0]), int(input_size[1])) if input_size is not None else None
    model = DarknetDetector(parse_cfg(_resolve_cfg(cfg)), class_names=class_names,
                            input_size=size)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        if path.suffix == ".weights":
            model.load_weights(path)
        else:
            _load_state_dict(model, path)
    return model


def _from_cfg_text(class_names: list[str], input_size: tuple[int, int], opts: dict[str, Any]) -> DarknetDetector:
    return DarknetDetector(parse_cfg_text(opts["cfg_text"], "<.kdbnn cfg>"), class_names=class_names or None,
                           input_size=input_size)


register_skeleton("darknet", {"cfg_text": "text"}, _from_cfg_text)


def random_weights_(model: DarknetDetector, seed: int = 0) -> DarknetDetector:
    """Fill every conv/BN parameter with seeded random values of a sane scale (tests, checks).

    Conv weights ~ N(0, 2/fan_in) (He et al., 2015), biases/BN beta ~ N(0, 0.1), gamma ~ U(0.5, 1.5), running mean
    ~ N(0, 0.1), running var ~ U(0.5, 1.5).
    """
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _, m in model.conv_layers():
            fan_in = m.conv.weight[0].numel()
            for name, t in m.darknet_blobs():
                if name == "conv.weight":
                    v = rng.normal(0, np.sqrt(2.0 / fan_in), t.shape)
                elif name in ("bn.weight", "bn.running_var"):
                    v = rng.uniform(0.5, 1.5, t.shape)
                else:
                    v = rng.normal(0, 0.1, t.shape)
                t.copy_(torch.from_numpy(v.astype(np.float32)))
    return model
