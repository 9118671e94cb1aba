"""MobileNet-YOLO: a MobileNetV2 backbone with the YOLOv2 detection head and passthrough layer.

The teacher of Xu et al. (ICRA 2019) named MobileNet-YOLO: the YOLOv2 head (Redmon & Farhadi,
CVPR 2017) — two 3x3 convs on the stride-32 features, a passthrough that reorganises the
stride-16 features (1x1 conv, then space-to-depth by 2) and concatenates them, a 3x3 conv and
the 1x1 prediction conv — on a MobileNetV2 backbone (Sandler et al., CVPR 2018, torchvision's
implementation, built without pretrained weights; ImageNet weights come only from a local file).

The paper-sized default (width 1.0, 1024-channel head) is large; a small CPU demo version is
e.g. ``MobileNetYOLO(classes, (192, 640), width_mult=0.35, head_channels=128,
passthrough_channels=16, last_conv=False)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.models.anchors import kitti_default_anchors
from kd_bnn.models.detector import DETECTORS, Detections, Detector, register_skeleton
from kd_bnn.models.heads.common import AnchorHeadsMixin, heads_loss, predict_heads
from kd_bnn.models.heads.common import check_input_size as _check_input_size
from kd_bnn.models.heads.yolov2 import REGION_HYPER_KINDS, RegionHead
from kd_bnn.models.state_dict import load_state_dict_file

#: ImageNet statistics (torchvision's pretrained MobileNetV2 expects inputs normalised by them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_STRIDE16_BLOCK = 13  # last inverted-residual block at stride 16 in torchvision's MobileNetV2
_STRIDE8_BLOCK = 6


class Normalize(nn.Module):
    """Fixed per-channel ``(x - mean) / std`` (no parameters; foldable into the first conv)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBNLeaky(nn.Sequential):
    """conv (no bias) -> batch norm -> leaky ReLU(0.1): the YOLOv2 convolution block."""

    def __init__(self, c_in: int, c_out: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(0.1, inplace=True)


class SpaceToDepth(nn.Module):
    """YOLOv2 passthrough reorganisation: (B, C, H, W) -> (B, C*s*s, H/s, W/s).

    Uses `torch.nn.functional.pixel_unshuffle` ordering (channel-major); Darknet's ``[reorg]``
    orders channels differently, which does not matter for a model trained in this form.
    """

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.stride)


class MobileNetYOLO(AnchorHeadsMixin, Detector):
    """MobileNetV2 + YOLOv2 head with passthrough (the paper's MobileNet-YOLO teacher).

    Args:
        class_names: names of the predicted classes.
        input_size: (height, width), both multiples of 32.
        anchors: (A, 2) anchors in stride-32 grid cells; default: the KITTI k=5 anchors
            rescaled to `input_size`.
        width_mult: MobileNetV2 width multiplier (1.0 as the paper; 0.35 for a CPU demo).
        head_channels: channels of the YOLOv2 head convs (1024 in YOLOv2).
        passthrough_channels: channels of the 1x1 conv before space-to-depth (64 in YOLOv2).
        last_conv: keep MobileNetV2's final 1x1 conv to 1280 channels.
        normalize: subtract / divide the ImageNet mean and std first (images are in [0, 1]).
        backbone_weights: local torchvision MobileNetV2 state dict (``.pth`` loaded with
            ``weights_only=True``, or ``.safetensors``); nothing is ever downloaded.
        **head_hyper: `RegionHead` loss settings (object_scale, ignore_thresh, rescore, ...).
    """

    def __init__(self, class_names: Sequence[str], input_size: tuple[int, int] = (384, 1248),
                 anchors: Sequence[Sequence[float]] | None = None, width_mult: float = 1.0,
                 head_channels: int = 1024, passthrough_channels: int = 64, last_conv: bool = True,
                 normalize: bool = True, backbone_weights: str | os.PathLike | None = None, **head_hyper):
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.class_names = list(class_names)
        if not self.class_names:
            raise ValueError("class_names: expected at least one class")
        self.input_size = _check_input_size(input_size, 32)
        if anchors is None:
            anchors = (torch.as_tensor(kitti_default_anchors(self.input_size, 5)) / 32.0).tolist()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD) if normalize else nn.Identity()
        features = mobilenet_v2(weights=None, width_mult=width_mult).features
        if backbone_weights is not None:
            _load_backbone(features, backbone_weights)
        if not last_conv:
            features = features[:-1]
        self.backbone = features
        c16 = _out_channels(self.backbone[_STRIDE16_BLOCK])
        c32 = _out_channels(self.backbone[-1])
        self.head = nn.Module()
        self.head.conv1 = ConvBNLeaky(c32, head_channels, 3)
        self.head.conv2 = ConvBNLeaky(head_channels, head_channels, 3)
        self.passthrough = nn.Sequential()
        self.passthrough.conv = ConvBNLeaky(c16, passthrough_channels, 1)
        self.passthrough.reorg = SpaceToDepth(2)
        self.head.conv3 = ConvBNLeaky(head_channels + 4 * passthrough_channels, head_channels, 3)
        self.region = RegionHead(anchors, len(self.class_names), 32, **head_hyper)
        self.head.pred = nn.Conv2d(head_channels, self.region.channels, 1)
        last = len(self.backbone) - 1
        self.taps = {
            "stride8": f"backbone.{_STRIDE8_BLOCK}",
            "stride16": f"backbone.{_STRIDE16_BLOCK}",
            "stride32": f"backbone.{last}",
            "head": "head.conv3",
        }

    def anchor_heads(self) -> list:
        return [self.region]

    def prediction_convs(self) -> list[str]:
        """Module paths of the convs producing the raw head maps (kept float by binarization)."""
        return ["head.pred"]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> [raw region map (B, A*(5+C), H/32, W/32)]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), found {tuple(images.shape)}")
        if images.shape[-2] % 32 or images.shape[-1] % 32:
            _check_input_size(tuple(images.shape[-2:]), 32)
        x = self.normalize(images)
        x = self.backbone[: _STRIDE16_BLOCK + 1](x)
        fine = self.passthrough(x)
        x = self.backbone[_STRIDE16_BLOCK + 1:](x)
        x = self.head.conv2(self.head.conv1(x))
        x = self.head.conv3(torch.cat([x, fine], dim=1))
        return [self.head.pred(x)]

    def _input_size_of(self, raw: Sequence[torch.Tensor]) -> tuple[int, int]:
        h, w = raw[0].shape[-2:]
        return h * 32, w * 32

    def loss(self, raw: Sequence[torch.Tensor], targets: torch.Tensor,
             ignore: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """YOLOv2 region loss (`kd_bnn.models.heads.yolov2`), per image."""
        return heads_loss([self.region], list(raw), targets, ignore, self._input_size_of(raw))

    def predict(self, raw: Sequence[torch.Tensor], conf_thres: float = 0.005, iou_thres: float = 0.45,
                max_det: int = 300) -> list[Detections]:
        """Decode, score = objectness x class probability, class-wise NMS."""
        return predict_heads([self.region], [r.detach() for r in raw], self._input_size_of(raw),
                             conf_thres, iou_thres, max_det)


def _out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _load_backbone(features: nn.Sequential, path: str | os.PathLike) -> None:
    state = load_state_dict_file(path)
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    own = features.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(
            f"{path}: not a torchvision MobileNetV2 state dict for this width multiplier; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {bad[:5]}"
        )
    features.load_state_dict(state)


@DETECTORS.register("mobilenet_yolo")
def build_mobilenet_yolo(class_names: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                         input_size: tuple[int, int] = (384, 1248), weights: str | os.PathLike | None = None,
                         cfg: str | None = None, trust: bool = False, **options) -> MobileNetYOLO:
    """Factory for ``model.family: mobilenet_yolo``; ``options`` go to `MobileNetYOLO`.

    `weights` is a state dict of the whole model (safetensors or ``weights_only`` torch file).
    `cfg` and `trust` are accepted for a uniform factory signature and must be unset / unused.
    """
    if cfg is not None:
        raise ValueError(f"model.cfg: the mobilenet_yolo family takes no cfg file, found {cfg!r}; "
                         "set its options under model.options (width_mult, head_channels, ...)")
    model = MobileNetYOLO(class_names, input_size, **options)
    model.set_skeleton("mobilenet_yolo", {k: v for k, v in options.items() if k != "backbone_weights"})
    if weights is not None:
        state = load_state_dict_file(weights)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{weights}: state dict does not match this MobileNetYOLO: "
                             f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model


register_skeleton("mobilenet_yolo", {
    "anchors": "anchors?", "width_mult": "float", "head_channels": "int", "passthrough_channels": "int",
    "last_conv": "bool", "normalize": "bool", **REGION_HYPER_KINDS})
