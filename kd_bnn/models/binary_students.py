"""Binary-friendly students: BinaryDenseNet-YOLO and Bi-Real-YOLO (families ``binary_densenet``, ``bireal``).

Both are built binary from the start (their 3x3 convs are ``BinaryConv2d`` modules named
``bconv``), so ``binarize`` leaves them alone ("already binary"); give the student config a
``binary.include: ["re:.*bconv"]`` so that the float convs (stem, transitions, shortcuts, head)
are "not included by policy" and the conversion report is a no-op.

BinaryDenseNet (Bethge et al., "Back to Simplicity: How to Train Accurate BNNs from Scratch?",
2019): dense blocks whose layers are ``BN -> [act] -> binary 3x3 conv (growth channels)`` and
whose output is the concatenation of the block input and every layer output; transitions
``BN -> max-pool 2x2 -> ReLU -> float 1x1 conv`` dividing the channels by a reduction factor;
no weight scaling factors (``weight_scaling="none"``) and an STE clip of 1.3.

Bi-Real Net (Liu et al., "Bi-Real Net: Enhancing the Performance of 1-bit CNNs with Improved
Representational Capability and Advanced Training Algorithm", ECCV 2018): every binary 3x3 conv
is wrapped as ``out = BN(binconv(sign(x))) + shortcut(x)`` with a real-valued identity
shortcut; a downsampling unit's shortcut is ``avg-pool 2x2 -> float 1x1 conv -> BN``; the
activation sign uses the ApproxSign gradient (``approx_sign``).

Both feed the YOLOv2 head with passthrough (Redmon & Farhadi, CVPR 2017) of
`kd_bnn.models.mobilenet_yolo`: 3x3 head convs, the stride-16 features reduced by a float 1x1
conv and reorganised space-to-depth, concatenated with the stride-32 features, and a float 1x1
prediction conv. The 3x3 head convs are float with ``head_binary=False`` (the class default) and
``BN -> binary conv -> BN -> leaky`` with ``head_binary=True``, which both presets use: at
384x1248 a float 512-channel head alone packs to 25 MB (BinaryDenseNet preset: 27.9 MB packed,
2.0x, instead of 3.9 MB, 14.2x), and Xu et al.'s copy-of-teacher student binarizes its head
3x3 convs too.

Forward graph (what an exporter walks; every module is one of Conv2d, BinaryConv2d, BatchNorm2d,
ReLU, LeakyReLU, Hardtanh, Identity, MaxPool2d, AvgPool2d, SpaceToDepth, or a container below)::

    x = images                                   # (B, 3, H, W) in [0, 1]
    for name, m in backbone.named_children():    # an nn.Sequential, run in order
        x = m(x)
        if name == stride16_name: fine = x       # "block3" / "stage3"
    # DenseBlock.forward:  for layer in layers: x = cat([x, layer(x)], dim=1)
    #                      layer = Sequential(bn, act, bconv)
    # BiRealUnit.forward:  x = bn(bconv(act(x))) + shortcut(x)
    #                      shortcut = Identity | Sequential(pool?, conv (1x1 float), bn)
    # every other backbone child and transition is a plain Sequential
    fine = passthrough(fine)                     # Sequential(conv 1x1, bn, act, reorg)
    x = head.conv1(x)                            # Sequential(conv|[bn_in, bconv], bn, act)
    x = head.conv2(x) if head has conv2
    x = head.conv3(cat([x, fine], dim=1))
    raw = [head.pred(x)]                         # float 1x1 conv -> (B, A*(5+C), H/32, W/32)

Presets (``preset=`` in the options; any other option overrides the preset's value):
``small`` (CPU demo, 192x640 input) and ``darknet19`` (about DarkNet-19 YOLOv2's cost at
384x1248; BinaryDenseNet-37 / Bi-Real-34-like backbones).
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.models.anchors import kitti_default_anchors
from kd_bnn.models.detector import DETECTORS, Detections, Detector, register_skeleton
from kd_bnn.models.heads.common import AnchorHeadsMixin, heads_loss, predict_heads
from kd_bnn.models.heads.common import check_input_size as _check_input_size
from kd_bnn.models.heads.yolov2 import REGION_HYPER_KINDS, RegionHead
from kd_bnn.models.mobilenet_yolo import SpaceToDepth
from kd_bnn.models.state_dict import load_state_dict_file


class StudentConfigError(ValueError):
    """A student size option that cannot build a valid network (names the layer)."""


#: Activation placed before a binary conv. In xnor mode the conv binarizes its input itself, so
#: "none" is the default; a BWN conv sees float activations and needs a real nonlinearity.
_ACTS = {"none": nn.Identity, "relu": lambda: nn.ReLU(inplace=False), "hardtanh": nn.Hardtanh}

DENSENET_PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo (192x640): 0.29 M parameters, 0.08 GMACs, a batch-8 train step about as fast as the
    # yolov2-demo.cfg teacher's on one core.
    "small": dict(
        stem_channels=16,
        stem_kernel=3,
        blocks=(1, 2, 2, 2),
        growth=(16, 16, 24, 32),
        reduction=2.0,
        round_to=8,
        head_channels=96,
        head_depth=1,
        passthrough_channels=16,
        head_binary=True,
    ),
    # BinaryDenseNet-37 backbone (growth 64, blocks 6-8-12-6, reductions 3.3/3.3/4, channels in
    # multiples of 32, Bethge et al.) with a 512-channel binary YOLOv2 head: 48.1 GMACs at
    # 384x1248 (DarkNet-19 YOLOv2: 40.6 GMACs), 14.7 M parameters, 3.9 MB packed.
    "darknet19": dict(
        stem_channels=64,
        stem_kernel=7,
        blocks=(6, 8, 12, 6),
        growth=64,
        reduction=(3.3, 3.3, 4.0),
        round_to=32,
        head_channels=512,
        head_depth=1,
        passthrough_channels=64,
        head_binary=True,
    ),
}

BIREAL_PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo (192x640): 0.55 M parameters, 0.13 GMACs.
    "small": dict(
        stem_channels=16,
        stem_kernel=3,
        widths=(16, 32, 64, 128),
        units=(1, 1, 2, 2),
        head_channels=96,
        head_depth=1,
        passthrough_channels=16,
        head_binary=True,
    ),
    # Bi-Real-34 layout (3-4-6-3 basic blocks = 6-8-12-6 binary units, widths 64..512) with a
    # 512-channel binary YOLOv2 head: about 38 GMACs at 384x1248 (DarkNet-19 YOLOv2: 40.6).
    "darknet19": dict(
        stem_channels=64,
        stem_kernel=7,
        widths=(64, 128, 256, 512),
        units=(6, 8, 12, 6),
        head_channels=512,
        head_depth=1,
        passthrough_channels=64,
        head_binary=True,
    ),
}


def _act(name: str, where: str) -> nn.Module:
    if name not in _ACTS:
        raise StudentConfigError(
            f"{where}: activation must be one of {sorted(_ACTS)}, found {name!r}"
        )
    return _ACTS[name]()


def _positive_int(value: Any, where: str, what: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise StudentConfigError(
            f"{where}: {what} must be a positive integer, found {value!r}"
        ) from None
    if v != value or v < 1:
        raise StudentConfigError(f"{where}: {what} must be a positive integer, found {value!r}")
    return v


def _per_stage(value: Any, n: int, where: str, what: str) -> list:
    if isinstance(value, (int, float)):
        return [value] * n
    vals = list(value)
    if len(vals) != n:
        raise StudentConfigError(
            f"{where}: {what} needs {n} values (one per stage), found {len(vals)}: {vals}"
        )
    return vals


class ConvBNAct(nn.Sequential):
    """Float conv (no bias) -> BatchNorm -> activation: stem and head blocks."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, act: str = "leaky"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(0.1, inplace=True) if act == "leaky" else nn.ReLU(inplace=True)


class BinaryConvBNAct(nn.Sequential):
    """BN -> binary conv -> BN -> leaky ReLU: a binary head conv (the first BN centres the
    input so that its sign carries information; post-ReLU maps would all sign to +1)."""

    def __init__(self, c_in: int, c_out: int, k: int, bin_opts: dict[str, Any]):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(c_in)
        self.bconv = BinaryConv2d(c_in, c_out, k, 1, k // 2, bias=False, **bin_opts)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(0.1, inplace=True)


class DenseBlock(nn.Module):
    """BinaryDenseNet dense block: ``for layer in layers: x = cat([x, layer(x)], 1)``.

    Each layer is ``Sequential(bn, act, bconv)`` with a binary 3x3 conv to ``growth`` channels
    (Bethge et al. 2019, Sec. 4).
    """

    def __init__(self, c_in: int, depth: int, growth: int, bin_opts: dict[str, Any], act: str):
        super().__init__()
        self.layers = nn.ModuleList()
        c = c_in
        for _ in range(depth):
            layer = nn.Sequential(
                OrderedDict(
                    bn=nn.BatchNorm2d(c),
                    act=_act(act, "activation"),
                    bconv=BinaryConv2d(c, growth, 3, 1, 1, bias=False, **bin_opts),
                )
            )
            self.layers.append(layer)
            c += growth
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class BiRealUnit(nn.Module):
    """Bi-Real unit: ``bn(bconv(act(x))) + shortcut(x)`` (Liu et al. 2018, Fig. 1).

    ``shortcut`` is the identity, or ``Sequential(pool (AvgPool2d 2x2, when stride 2), conv
    (float 1x1), bn)`` when the unit downsamples or changes the width.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, bin_opts: dict[str, Any], act: str):
        super().__init__()
        self.act = _act(act, "activation")
        self.bconv = BinaryConv2d(c_in, c_out, 3, stride, 1, bias=False, **bin_opts)
        self.bn = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        else:
            parts: OrderedDict[str, nn.Module] = OrderedDict()
            if stride != 1:
                parts["pool"] = nn.AvgPool2d(stride, stride)
            parts["conv"] = nn.Conv2d(c_in, c_out, 1, bias=False)
            parts["bn"] = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bconv(self.act(x))) + self.shortcut(x)


def _stem(c_out: int, k: int) -> nn.Sequential:
    """Float stem to stride 4: conv k x k stride 2 -> BN -> ReLU -> max-pool 2x2."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, c_out, k, 2, k // 2, bias=False),
            bn=nn.BatchNorm2d(c_out),
            act=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(2, 2),
        )
    )


class BinaryStudentYOLO(AnchorHeadsMixin, Detector):
    """Shared YOLOv2 head with passthrough on a binary backbone (``self.backbone``, a Sequential).

    Subclasses build ``self.backbone`` whose children run in order; the child named
    ``self._stride16`` outputs the stride-16 map fed to the passthrough. Binary options:
    ``mode`` (bwn | xnor), ``weight_scaling``, ``weight_quantizer``, ``input_quantizer``,
    ``clip``, ``pad_value``, ``input_scaling`` (as :class:`~kd_bnn.binary.BinaryConv2d`).
    """

    family = "student"
    _stride16 = ""

    def _init_common(
        self,
        class_names: Sequence[str],
        input_size: tuple[int, int],
        anchors: Sequence[Sequence[float]] | None,
        head_hyper: dict[str, Any],
    ) -> None:
        self.class_names = list(class_names)
        if not self.class_names:
            raise ValueError("class_names: expected at least one class")
        self.input_size = _check_input_size(input_size, 32)
        if anchors is None:
            anchors = (torch.as_tensor(kitti_default_anchors(self.input_size, 5)) / 32.0).tolist()
        self.region = RegionHead(anchors, len(self.class_names), 32, **head_hyper)

    @staticmethod
    def _binary_options(
        mode: str,
        weight_scaling: str,
        weight_quantizer: str,
        input_quantizer: str,
        clip: float,
        pad_value: float,
        input_scaling: str,
    ) -> dict[str, Any]:
        if mode not in ("bwn", "xnor"):
            raise StudentConfigError(
                f"model.options.mode: expected 'bwn' or 'xnor', found {mode!r}"
            )
        # Validate once on a 1x1 probe layer so that errors name the option, not a deep layer.
        opts = dict(
            mode=mode,
            weight_scaling=weight_scaling,
            weight_quantizer=weight_quantizer,
            input_quantizer=input_quantizer,
            clip=clip,
            pad_value=pad_value,
            input_scaling=input_scaling,
        )
        try:
            BinaryConv2d(1, 1, 1, **opts)
        except (ValueError, KeyError) as exc:
            raise StudentConfigError(f"model.options: {exc}") from None
        return opts

    def _build_head(
        self,
        c16: int,
        c32: int,
        head_channels: int,
        head_depth: int,
        passthrough_channels: int,
        head_binary: bool,
        bin_opts: dict[str, Any],
    ) -> None:
        hc = _positive_int(head_channels, "head.conv1", "head_channels")
        pc = _positive_int(passthrough_channels, "passthrough.conv", "passthrough_channels")
        if head_depth not in (1, 2):
            raise StudentConfigError(
                f"head: head_depth must be 1 or 2 (3x3 convs before the passthrough "
                f"concatenation), found {head_depth!r}"
            )

        def block(c_in: int, c_out: int) -> nn.Module:
            return (
                BinaryConvBNAct(c_in, c_out, 3, bin_opts)
                if head_binary
                else ConvBNAct(c_in, c_out, 3)
            )

        self.passthrough = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(c16, pc, 1, bias=False),
                bn=nn.BatchNorm2d(pc),
                act=nn.LeakyReLU(0.1, inplace=True),
                reorg=SpaceToDepth(2),
            )
        )
        self.head = nn.Module()
        self.head.conv1 = block(c32, hc)
        if head_depth == 2:
            self.head.conv2 = block(hc, hc)
        self.head.conv3 = block(hc + 4 * pc, hc)
        self.head.pred = nn.Conv2d(hc, self.region.channels, 1)

    # ------------------------------------------------------------------ Detector interface
    def anchor_heads(self) -> list:
        return [self.region]

    def prediction_convs(self) -> list[str]:
        """Module paths of the convs producing the raw head maps (float by design)."""
        return ["head.pred"]

    def float_convs(self) -> list[str]:
        """Paths of the float ``nn.Conv2d`` modules kept float by design (stem, transitions, ...)."""
        return [
            n
            for n, m in self.named_modules()
            if isinstance(m, nn.Conv2d) and not isinstance(m, BinaryConv2d)
        ]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> [raw region map (B, A*(5+C), H/32, W/32)]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), found {tuple(images.shape)}")
        if images.shape[-2] % 32 or images.shape[-1] % 32:
            _check_input_size(tuple(images.shape[-2:]), 32)
        x = images
        fine = None
        for name, m in self.backbone.named_children():
            x = m(x)
            if name == self._stride16:
                fine = x
        fine = self.passthrough(fine)
        x = self.head.conv1(x)
        if hasattr(self.head, "conv2"):
            x = self.head.conv2(x)
        x = self.head.conv3(torch.cat([x, fine], dim=1))
        return [self.head.pred(x)]

    def packed_plan(self, ops) -> Any | None:
        """Which binary convs read packed words on the packed runtime (Bi-Real units through a fused
        residual epilogue, dense layers and head convs through their consumer's BatchNorm bounds:
        `kd_bnn.models.binary_students_packed`); None when none does (e.g. BWN)."""
        from kd_bnn.models.binary_students_packed import student_packed_plan

        plan = student_packed_plan(self, ops)
        return plan if plan.packed_in else None

    def packed_forward(self, images: torch.Tensor, plan, ops) -> list[torch.Tensor]:
        from kd_bnn.models.binary_students_packed import student_packed_forward

        return student_packed_forward(self, images, plan, ops)

    def _input_size_of(self, raw: Sequence[torch.Tensor]) -> tuple[int, int]:
        h, w = raw[0].shape[-2:]
        return h * 32, w * 32

    def loss(
        self,
        raw: Sequence[torch.Tensor],
        targets: torch.Tensor,
        ignore: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """YOLOv2 region loss (`kd_bnn.models.heads.yolov2`), per image."""
        return heads_loss([self.region], list(raw), targets, ignore, self._input_size_of(raw))

    def predict(
        self,
        raw: Sequence[torch.Tensor],
        conf_thres: float = 0.005,
        iou_thres: float = 0.45,
        max_det: int = 300,
    ) -> list[Detections]:
        """Decode, score = objectness x class probability, class-wise NMS."""
        return predict_heads(
            [self.region],
            [r.detach() for r in raw],
            self._input_size_of(raw),
            conf_thres,
            iou_thres,
            max_det,
        )


class BinaryDenseNetYOLO(BinaryStudentYOLO):
    """BinaryDenseNet backbone (Bethge et al. 2019) + YOLOv2 head with passthrough.

    Args:
        class_names, input_size (H, W multiples of 32), anchors (grid cells; default KITTI k=5).
        stem_channels, stem_kernel: float stem conv (to stride 4 with its max-pool).
        blocks: layers per dense block (4 blocks at strides 4, 8, 16, 32).
        growth: channels each binary 3x3 conv adds (an int or one per block).
        reduction: channel reduction factor of the 3 transitions (float or one per transition);
            output channels = round(C_in / reduction) rounded to a multiple of ``round_to``.
        mode, weight_scaling ("none" as BinaryDenseNet), weight_quantizer, input_quantizer,
            clip (1.3 as BinaryDenseNet), pad_value, input_scaling: binary conv options.
        activation: before each binary conv: "none" (default in xnor: the conv takes sign),
            "relu" (default in bwn: BWN keeps float activations, which need a nonlinearity), "hardtanh".
        head_channels, head_depth, passthrough_channels, head_binary: the YOLOv2 head.
        **head_hyper: `RegionHead` loss settings.
    """

    family = "binary_densenet"
    _stride16 = "block3"

    def __init__(
        self,
        class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
        input_size: tuple[int, int] = (384, 1248),
        anchors: Sequence[Sequence[float]] | None = None,
        *,
        stem_channels: int = 64,
        stem_kernel: int = 7,
        blocks: Sequence[int] = (6, 8, 12, 6),
        growth: int | Sequence[int] = 64,
        reduction: float | Sequence[float] = (3.3, 3.3, 4.0),
        round_to: int = 1,
        mode: str = "xnor",
        weight_scaling: str = "none",
        weight_quantizer: str = "ste_sign",
        input_quantizer: str = "ste_sign",
        clip: float = 1.3,
        pad_value: float = -1.0,
        input_scaling: str = "none",
        activation: str | None = None,
        head_channels: int = 512,
        head_depth: int = 1,
        passthrough_channels: int = 64,
        head_binary: bool = False,
        **head_hyper,
    ):
        super().__init__()
        self._init_common(class_names, input_size, anchors, head_hyper)
        bin_opts = self._binary_options(
            mode, weight_scaling, weight_quantizer, input_quantizer, clip, pad_value, input_scaling
        )
        act = activation or ("none" if mode == "xnor" else "relu")
        _act(act, "model.options.activation")
        self.mode = mode
        blocks = list(blocks)
        if len(blocks) != 4:
            raise StudentConfigError(
                f"model.options.blocks: expected 4 dense blocks (strides 4, 8, 16, 32), "
                f"found {len(blocks)}: {blocks}"
            )
        growths = _per_stage(growth, 4, "model.options.growth", "growth")
        reductions = _per_stage(reduction, 3, "model.options.reduction", "reduction")
        round_to = _positive_int(round_to, "model.options.round_to", "round_to")
        c = _positive_int(stem_channels, "backbone.stem.conv", "stem_channels")
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=_stem(c, _positive_int(stem_kernel, "backbone.stem.conv", "stem_kernel"))
        )
        c16 = 0
        for i in range(4):
            name = f"block{i + 1}"
            depth = _positive_int(
                blocks[i], f"backbone.{name}", f"blocks[{i}] (layers in the dense block)"
            )
            g = growths[i]
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                raise StudentConfigError(
                    f"backbone.{name}.layers.0.bconv: growth rate {g!r} gives {g!r} output channels; "
                    "a binary conv needs a positive integer number of output channels"
                )
            block = DenseBlock(c, depth, g, bin_opts, act)
            layers[name] = block
            c = block.out_channels
            if i == 2:
                c16 = c  # the passthrough reads block3's output (before trans3)
            if i < 3:
                r = reductions[i]
                tname = f"trans{i + 1}"
                if not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
                    raise StudentConfigError(
                        f"backbone.{tname}.conv: reduction must be a positive number, found {r!r}"
                    )
                c_out = int(round(c / r / round_to)) * round_to
                if c_out < 1:
                    raise StudentConfigError(
                        f"backbone.{tname}.conv: reduction {r} of {c} channels (rounded to a multiple of "
                        f"{round_to}) gives {c_out} output channels; the next dense block "
                        f"backbone.block{i + 2} needs at least 1 input channel"
                    )
                layers[tname] = nn.Sequential(
                    OrderedDict(
                        bn=nn.BatchNorm2d(c),
                        pool=nn.MaxPool2d(2, 2),
                        act=nn.ReLU(inplace=True),
                        conv=nn.Conv2d(c, c_out, 1, bias=False),
                    )
                )
                c = c_out
        layers["post"] = nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(c), act=nn.ReLU(inplace=True)))
        self.backbone = nn.Sequential(layers)
        self._build_head(
            c16, c, head_channels, head_depth, passthrough_channels, head_binary, bin_opts
        )
        self.taps = {
            "stride8": "backbone.block2",
            "stride16": "backbone.block3",
            "stride32": "backbone.post",
            "head": "head.conv3",
        }


class BiRealYOLO(BinaryStudentYOLO):
    """Bi-Real Net backbone (Liu et al. 2018) + YOLOv2 head with passthrough.

    Args:
        class_names, input_size, anchors: as `BinaryDenseNetYOLO`.
        stem_channels, stem_kernel: float stem (to stride 4).
        widths: channels of the 4 stages (strides 4, 8, 16, 32).
        units: binary units (one binary 3x3 conv + shortcut each) per stage; the first unit of
            stages 2-4 downsamples (stride-2 binary conv, avg-pool + 1x1 conv shortcut).
        mode, weight_scaling ("mean_abs": Bi-Real's magnitude-aware weights), weight_quantizer,
            input_quantizer ("approx_sign" as Bi-Real), clip, pad_value, input_scaling.
        activation: before each binary conv ("none" in xnor, "relu" in bwn by default).
        head_channels, head_depth, passthrough_channels, head_binary, **head_hyper: head.
    """

    family = "bireal"
    _stride16 = "stage3"

    def __init__(
        self,
        class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
        input_size: tuple[int, int] = (384, 1248),
        anchors: Sequence[Sequence[float]] | None = None,
        *,
        stem_channels: int = 64,
        stem_kernel: int = 7,
        widths: Sequence[int] = (64, 128, 256, 512),
        units: Sequence[int] = (6, 8, 12, 6),
        mode: str = "xnor",
        weight_scaling: str = "mean_abs",
        weight_quantizer: str = "ste_sign",
        input_quantizer: str = "approx_sign",
        clip: float = 1.0,
        pad_value: float = -1.0,
        input_scaling: str = "none",
        activation: str | None = None,
        head_channels: int = 512,
        head_depth: int = 1,
        passthrough_channels: int = 64,
        head_binary: bool = False,
        **head_hyper,
    ):
        super().__init__()
        self._init_common(class_names, input_size, anchors, head_hyper)
        bin_opts = self._binary_options(
            mode, weight_scaling, weight_quantizer, input_quantizer, clip, pad_value, input_scaling
        )
        act = activation or ("none" if mode == "xnor" else "relu")
        _act(act, "model.options.activation")
        self.mode = mode
        widths, units = list(widths), list(units)
        for key, vals in (("widths", widths), ("units", units)):
            if len(vals) != 4:
                raise StudentConfigError(
                    f"model.options.{key}: expected 4 values (stages at strides 4, 8, 16, 32), "
                    f"found {len(vals)}: {vals}"
                )
        c = _positive_int(stem_channels, "backbone.stem.conv", "stem_channels")
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=_stem(c, _positive_int(stem_kernel, "backbone.stem.conv", "stem_kernel"))
        )
        c16 = 0
        for i in range(4):
            name = f"stage{i + 1}"
            w = widths[i]
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise StudentConfigError(
                    f"backbone.{name}.0.bconv: width {w!r} gives {w!r} output channels; "
                    "a binary conv needs a positive integer number of output channels"
                )
            n = _positive_int(units[i], f"backbone.{name}", f"units[{i}]")
            stage = nn.Sequential()
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BiRealUnit(c, w, stride, bin_opts, act))
                c = w
            layers[name] = stage
            if i == 2:
                c16 = c
        self.backbone = nn.Sequential(layers)
        self._build_head(
            c16, c, head_channels, head_depth, passthrough_channels, head_binary, bin_opts
        )
        self.taps = {
            "stride8": "backbone.stage2",
            "stride16": "backbone.stage3",
            "stride32": "backbone.stage4",
            "head": "head.conv3",
        }


# ---------------------------------------------------------------------------- factories


def _with_preset(
    presets: dict[str, dict[str, Any]], preset: str | None, options: dict[str, Any], family: str
) -> dict[str, Any]:
    if preset is None:
        return dict(options)
    if preset not in presets:
        raise StudentConfigError(
            f"model.options.preset: {family} presets are {sorted(presets)}, found {preset!r}"
        )
    merged = copy.deepcopy(presets[preset])
    merged.update(options)
    return merged


def _load_weights(model: Detector, weights: str | os.PathLike | None) -> None:
    if weights is None:
        return
    state = load_state_dict_file(weights)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights}: state dict does not match this {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _no_cfg(family: str, cfg: str | None) -> None:
    if cfg is not None:
        raise ValueError(
            f"model.cfg: the {family} family takes no cfg file, found {cfg!r}; "
            "set its size under model.options (preset, blocks, growth, ...)"
        )


@DETECTORS.register("binary_densenet")
def build_binary_densenet(
    class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
    input_size: tuple[int, int] = (384, 1248),
    weights: str | os.PathLike | None = None,
    cfg: str | None = None,
    trust: bool = False,
    preset: str | None = "darknet19",
    **options,
) -> BinaryDenseNetYOLO:
    """Factory for ``model.family: binary_densenet``: a preset (``small`` | ``darknet19``) plus
    `BinaryDenseNetYOLO` options; `weights`: a whole-model state dict (safetensors / weights_only)."""
    _no_cfg("binary_densenet", cfg)
    model = BinaryDenseNetYOLO(
        class_names,
        input_size,
        **_with_preset(DENSENET_PRESETS, preset, options, "binary_densenet"),
    )
    model.set_skeleton("binary_densenet", {"preset": preset, **options})
    _load_weights(model, weights)
    return model


@DETECTORS.register("bireal")
def build_bireal(
    class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
    input_size: tuple[int, int] = (384, 1248),
    weights: str | os.PathLike | None = None,
    cfg: str | None = None,
    trust: bool = False,
    preset: str | None = "darknet19",
    **options,
) -> BiRealYOLO:
    """Factory for ``model.family: bireal``: a preset (``small`` | ``darknet19``) plus `BiRealYOLO` options."""
    _no_cfg("bireal", cfg)
    model = BiRealYOLO(
        class_names, input_size, **_with_preset(BIREAL_PRESETS, preset, options, "bireal")
    )
    model.set_skeleton("bireal", {"preset": preset, **options})
    _load_weights(model, weights)
    return model


#: Options every native student shares, with their skeleton kinds (`register_skeleton`).
_STUDENT_KINDS = {
    "preset": "name?", "anchors": "anchors?", "stem_channels": "int", "stem_kernel": "int",
    "mode": "name", "weight_scaling": "name", "weight_quantizer": "name", "input_quantizer": "name",
    "clip": "float", "pad_value": "float", "input_scaling": "name", "activation": "name?",
    "head_channels": "int", "head_depth": "int", "passthrough_channels": "int", "head_binary": "bool",
    **REGION_HYPER_KINDS,
}
register_skeleton("binary_densenet", {**_STUDENT_KINDS, "blocks": "ints", "growth": "ints",
                                      "reduction": "floats", "round_to": "int"})
register_skeleton("bireal", {**_STUDENT_KINDS, "widths": "ints", "units": "ints"})


#: The binary options these factories take: read from the experiment's ``student.binary``
#: (`kd_bnn.engine.build.native_binary_options`), never repeated in ``student.model.options``.
NATIVE_BINARY_OPTIONS = ("mode", "weight_scaling", "weight_quantizer", "input_quantizer", "clip", "pad_value",
                         "input_scaling")
build_binary_densenet.binary_options = NATIVE_BINARY_OPTIONS
build_bireal.binary_options = NATIVE_BINARY_OPTIONS
