"""Adapters that map a student feature map onto the teacher's shape before a mimic loss.

Identity when shapes match; a 1x1 convolution (+BatchNorm) when channels differ (the FitNets
"regressor", Romero et al. 2015; Li et al. 2017 use the same 1x1 transform); a resize when the
strides differ (average pooling for an integer down-scale, bilinear interpolation otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _chw(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"feature shape must be (C, H, W) or (N, C, H, W), found {shape}")
    return shape  # type: ignore[return-value]


class Resize(nn.Module):
    """Resize a (N, C, H, W) map to ``size`` = (H, W): average pooling when both sides shrink
    by the same integer factor, bilinear interpolation otherwise."""

    def __init__(self, size: tuple[int, int], mode: str = "auto") -> None:
        super().__init__()
        if mode not in ("auto", "interpolate", "avgpool"):
            raise ValueError(f"resize mode must be auto, interpolate or avgpool, found {mode!r}")
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        th, tw = self.size
        if (h, w) == (th, tw):
            return x
        integer = h % th == 0 and w % tw == 0 and h // th == w // tw and h > th
        if self.mode == "avgpool" or (self.mode == "auto" and integer):
            if not integer:
                return F.adaptive_avg_pool2d(x, self.size)
            k = h // th
            return F.avg_pool2d(x, kernel_size=k, stride=k)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"


class Adapter(nn.Module):
    """Student -> teacher map: optional resize then optional 1x1 conv (+BN)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int],
                 match_channels: bool = True, bn: bool = True, resize: str = "auto") -> None:
        super().__init__()
        cs, hs, ws = _chw(student_shape)
        ct, ht, wt = _chw(teacher_shape)
        self.student_shape = (cs, hs, ws)
        self.teacher_shape = (ct, ht, wt)
        self.resize = Resize((ht, wt), resize) if (hs, ws) != (ht, wt) else None
        if match_channels and cs != ct:
            layers: list[nn.Module] = [nn.Conv2d(cs, ct, kernel_size=1, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(ct))
            self.proj: nn.Module | None = nn.Sequential(*layers)
        else:
            self.proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            x = self.resize(x)
        if self.proj is not None:
            x = self.proj(x)
        return x


def build_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int],
                  match_channels: bool = True, bn: bool = True, resize: str = "auto") -> nn.Module:
    """An adapter from a student map of ``student_shape`` to ``teacher_shape``.

    Args:
        student_shape, teacher_shape: (C, H, W) or (N, C, H, W).
        match_channels: project channels with a 1x1 conv when they differ (False for losses
            that reduce over channels, such as attention transfer).
        bn: add BatchNorm after the 1x1 conv.
        resize: "auto" (avg-pool for an integer down-scale, else bilinear), "interpolate",
            or "avgpool".

    Returns:
        ``nn.Identity()`` when nothing needs adapting, else an `Adapter`.
    """
    cs, hs, ws = _chw(student_shape)
    ct, ht, wt = _chw(teacher_shape)
    if (hs, ws) == (ht, wt) and (cs == ct or not match_channels):
        return nn.Identity()
    return Adapter((cs, hs, ws), (ct, ht, wt), match_channels=match_channels, bn=bn, resize=resize)
