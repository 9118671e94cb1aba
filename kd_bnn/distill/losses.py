"""Distillation losses, registered by name in `DISTILL_LOSSES` (configs name them as strings).

Feature-level losses take ``(student_map, teacher_map, ctx)`` where the student map has already
been adapted to the teacher's shape; output-level losses (``level = "output"``) take the raw
head outputs of both detectors. Each class cites the paper its formula comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.registry import Registry

#: name -> loss class; ``DISTILL_LOSSES.build(name, **options)``.
DISTILL_LOSSES = Registry("distillation loss")


@dataclass
class DistillContext:
    """What a loss may need besides the two maps.

    Attributes:
        targets: (N, 6) rows ``(image_index, class, x1, y1, x2, y2)`` in input pixels.
        ignore: per-image DontCare boxes (M_i, 4), or None.
        image_size: (H, W) of the network input.
        student_model, teacher_model: the (unwrapped) detectors, for output layouts.
    """

    targets: torch.Tensor | None = None
    ignore: list[torch.Tensor] | None = None
    image_size: tuple[int, int] | None = None
    student_model: nn.Module | None = None
    teacher_model: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class. ``level`` is "feature" or "output"; ``match_channels`` tells the distiller
    whether the student map must be projected to the teacher's channel count."""

    level = "feature"
    match_channels = True

    def forward(self, student: Any, teacher: Any, ctx: DistillContext | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement DistillLoss.forward")


def _check_same(s: torch.Tensor, t: torch.Tensor, name: str) -> None:
    if not (torch.is_tensor(s) and torch.is_tensor(t)):
        raise TypeError(f"{name}: expected tensors, found {type(s).__name__} and {type(t).__name__}")
    if s.shape != t.shape:
        raise ValueError(f"{name}: student map {tuple(s.shape)} and teacher map {tuple(t.shape)} "
                         "differ in shape (is an adapter missing?)")


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero-mean, unit-variance per sample over (C, H, W) (a per-map normalisation)."""
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.var(dim=dims, keepdim=True, unbiased=False).add(eps).sqrt()
    return (x - mean) / std


@DISTILL_LOSSES.register("mimic_l2")
class MimicL2(DistillLoss):
    """Feature mimic / hint loss: mean squared error between adapted student and teacher maps.

    ``L = mean((r(u) - v)^2)`` over batch, channels and positions; with ``normalize=True`` each
    map is first standardised per sample (zero mean, unit variance over C, H, W), which makes the
    loss scale-free when the teacher's activations are large.

    References:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
        Xu et al., "Training a Binary Weight Object Detector by Knowledge Transfer for
        Autonomous Driving", ICRA 2019 (feature-map mimic of a YOLOv2 teacher).
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = bool(normalize)

    def forward(self, student, teacher, ctx=None):
        _check_same(student, teacher, "mimic_l2")
        teacher = teacher.detach()
        if self.normalize:
            student, teacher = standardize(student), standardize(teacher)
        return F.mse_loss(student.float(), teacher.float())


def boxes_to_mask(targets: torch.Tensor | None, batch: int, feat_hw: tuple[int, int],
                  image_hw: tuple[int, int], expand: int = 0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(B, 1, h, w) float mask: 1 at feature cells overlapped by a ground-truth box.

    A box x1y1x2y2 in input pixels covers cells ``floor(x1/sx) .. ceil(x2/sx)-1`` with stride
    ``sx = W/w``; ``expand`` grows each box by that many cells on every side.
    """
    h, w = int(feat_hw[0]), int(feat_hw[1])
    mask = torch.zeros((batch, 1, h, w), device=device)
    if targets is None or targets.numel() == 0:
        return mask
    sy, sx = image_hw[0] / h, image_hw[1] / w
    for row in targets.detach().cpu().tolist():
        b = int(row[0])
        if not 0 <= b < batch:
            continue
        x1, y1, x2, y2 = row[2:6]
        c0 = max(int(x1 // sx) - expand, 0)
        r0 = max(int(y1 // sy) - expand, 0)
        c1 = min(int(-(-x2 // sx)) + expand, w)  # ceil
        r1 = min(int(-(-y2 // sy)) + expand, h)
        c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)  # a box thinner than a cell still covers one
        if c0 < w and r0 < h:
            mask[b, 0, r0:r1, c0:c1] = 1.0
    return mask


@DISTILL_LOSSES.register("mimic_masked")
class MimicMasked(DistillLoss):
    """Mimic loss restricted to object regions.

    ``L = sum(M * (r(u) - v)^2) / (C * sum(M))`` where ``M`` marks the feature cells covered by
    ground-truth boxes scaled to the map, united (``teacher_conf`` > 0) with the cells where the
    teacher's objectness exceeds ``teacher_conf`` (Detectors with YOLO anchor ``heads``), or
    ``ctx.extra["mask"]`` when given; ``background_weight`` > 0 adds that much of the plain mean
    error elsewhere. With no object in the batch the loss is 0 (plus the background term).

    References:
        Li, Jin, Yan, "Mimicking Very Efficient Network for Object Detection", CVPR 2017.
    """

    def __init__(self, expand: int = 0, background_weight: float = 0.0, normalize: bool = False,
                 teacher_conf: float = 0.0) -> None:
        super().__init__()
        self.expand = int(expand)
        self.background_weight = float(background_weight)
        self.normalize = bool(normalize)
        self.teacher_conf = float(teacher_conf)

    def forward(self, student, teacher, ctx=None):
        _check_same(student, teacher, "mimic_masked")
        teacher = teacher.detach()
        if self.normalize:
            student, teacher = standardize(student), standardize(teacher)
        ctx = ctx or DistillContext()
        b, c, h, w = student.shape
        mask = ctx.extra.get("mask")
        if mask is None:
            if ctx.image_size is None:
                raise ValueError("mimic_masked needs ctx.image_size (input H, W) to scale boxes")
            mask = boxes_to_mask(ctx.targets, b, (h, w), ctx.image_size, self.expand, student.device)
            if self.teacher_conf > 0:
                conf = teacher_confidence_mask(ctx.teacher_model, ctx.extra.get("teacher_raw"),
                                               (h, w), self.teacher_conf)
                if conf is not None:
                    mask = torch.maximum(mask, conf.to(mask))
        mask = mask.to(student.dtype)
        err = (student.float() - teacher.float()).pow(2)
        denom = mask.sum() * c
        loss = (err * mask).sum() / denom.clamp_min(1.0)
        if self.background_weight > 0:
            bg = 1.0 - mask
            loss = loss + self.background_weight * (err * bg).sum() / (bg.sum() * c).clamp_min(1.0)
        return loss


def teacher_confidence_mask(model: nn.Module | None, raw: Any, feat_hw: tuple[int, int],
                            threshold: float) -> torch.Tensor | None:
    """(B, 1, h, w) mask of cells where `model` sees an object with probability above `threshold`
    (its ``objectness_maps(raw)`` hook: per head (B, H, W)), resized to the feature map
    (max-pooled when shrinking, nearest when growing) and united over heads; None when the model
    has no objectness maps."""
    fn = getattr(model, "objectness_maps", None)
    maps = fn(raw) if (raw is not None and callable(fn)) else None
    if not maps:
        return None
    out = None
    for obj in maps:
        m = (obj.detach().float() > threshold).float()[:, None]
        if m.shape[-2:] != tuple(feat_hw):
            if m.shape[-2] >= feat_hw[0] and m.shape[-1] >= feat_hw[1]:
                m = F.adaptive_max_pool2d(m, feat_hw)
            else:
                m = F.interpolate(m, size=feat_hw, mode="nearest")
        out = m if out is None else torch.maximum(out, m)
    return out


def attention_map(x: torch.Tensor, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """Spatial attention ``Q = sum_c |A_c|^p``, flattened and L2-normalised: (N, H*W)."""
    q = x.float().abs().pow(p).sum(dim=1).flatten(1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(eps)


@DISTILL_LOSSES.register("attention")
class AttentionTransfer(DistillLoss):
    """Attention transfer: match normalised spatial attention maps.

    ``L = mean_n || Q_s/||Q_s|| - Q_t/||Q_t|| ||_2^2`` with ``Q = sum_c |A_c|^p`` (p = 2). The
    squared distance (the authors' code) keeps the gradient defined when the maps agree.
    Channels need not match, so only a resize adapter is used.

    References:
        Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
    """

    match_channels = False

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, student, teacher, ctx=None):
        if student.shape[-2:] != teacher.shape[-2:] or student.shape[0] != teacher.shape[0]:
            raise ValueError(f"attention: student {tuple(student.shape)} and teacher "
                             f"{tuple(teacher.shape)} differ in batch or spatial size")
        qs = attention_map(student, self.p)
        qt = attention_map(teacher.detach(), self.p)
        return (qs - qt).pow(2).sum(dim=1).mean()


@DISTILL_LOSSES.register("cwd")
class ChannelWiseDistill(DistillLoss):
    """Channel-wise distillation: per channel, a softmax over positions with temperature T, KL.

    ``L = T^2 / (N C) * sum_{n,c} sum_i phi(t_{n,c})_i * log(phi(t_{n,c})_i / phi(s_{n,c})_i)``
    with ``phi(y)_i = exp(y_i / T) / sum_j exp(y_j / T)``.

    References:
        Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student, teacher, ctx=None):
        _check_same(student, teacher, "cwd")
        n, c = student.shape[:2]
        t = self.temperature
        s = student.float().reshape(n * c, -1) / t
        v = teacher.detach().float().reshape(n * c, -1) / t
        log_ps = F.log_softmax(s, dim=1)
        log_pt = F.log_softmax(v, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
        return kl.mean() * t * t


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of x1y1x2y2 boxes: (K, 4) x (G, 4) -> (K, G)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


@DISTILL_LOSSES.register("output_kd")
class OutputKD(DistillLoss):
    """Head-level KD: soft objectness / class targets with temperature, and a teacher-bounded
    box regression.

    The head layout comes from the ``layout`` option (a callable taking ``raw`` and returning a
    dict: Python API only, a config cannot name code) or else the detector's
    ``distill_outputs(raw)`` hook (`kd_bnn.models.Detector`). The dict holds per-prediction
    tensors of shape (B, K, ...):
    ``obj`` (B, K) objectness logits, ``cls`` (B, K, C) class logits, ``box`` (B, K, 4) decoded
    boxes x1y1x2y2 in input pixels; any may be missing.

    * objectness: ``T^2 * BCE(sigmoid(s/T), sigmoid(t/T))`` averaged over predictions;
    * classes: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, weighted by the teacher's objectness
      (background cells carry no class information);
    * boxes (Chen et al. 2017, teacher-bounded L2): for predictions whose teacher box matches a
      ground-truth box with IoU >= ``match_iou``, ``L_b = ||b_s - y||^2`` if
      ``||b_s - y||^2 + m > ||b_t - y||^2`` else 0, boxes normalised by the GT width/height.

    Without a layout, the raw outputs (a tensor or a list of tensors of identical shapes) are
    distilled channel-wise as independent sigmoid logits (``T^2 * BCE`` on every element).

    References:
        Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
        Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation",
        NeurIPS 2017.
    """

    level = "output"

    def __init__(self, temperature: float = 2.0, obj_weight: float = 1.0, cls_weight: float = 1.0,
                 box_weight: float = 1.0, margin: float = 0.0, match_iou: float = 0.5,
                 layout: Any = None) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.obj_weight, self.cls_weight, self.box_weight = float(obj_weight), float(cls_weight), float(box_weight)
        self.margin = float(margin)
        self.match_iou = float(match_iou)
        self.layout = layout

    def _layout_fn(self, model: nn.Module | None) -> Callable | None:
        if self.layout is not None:
            if not callable(self.layout):
                raise ValueError(f"output_kd: layout must be a callable (Python API), found {self.layout!r}; "
                                 "from a config the detector's distill_outputs hook is used")
            return self.layout
        return getattr(model, "distill_outputs", None) if model is not None else None

    def soft_bce(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        T = self.temperature
        return F.binary_cross_entropy_with_logits(s.float() / T, torch.sigmoid(t.detach().float() / T)) * T * T

    def forward(self, student, teacher, ctx=None):
        ctx = ctx or DistillContext()
        fs = self._layout_fn(ctx.student_model)
        ft = self._layout_fn(ctx.teacher_model)
        ls = fs(student) if fs is not None else None
        lt = ft(teacher) if ft is not None else None
        if ls is None or lt is None:
            return self._raw_kd(student, teacher)
        total = None
        T = self.temperature

        def add(x):
            nonlocal total
            total = x if total is None else total + x

        if "obj" in ls and "obj" in lt and self.obj_weight:
            add(self.obj_weight * self.soft_bce(ls["obj"], lt["obj"]))
        if "cls" in ls and "cls" in lt and self.cls_weight:
            log_ps = F.log_softmax(ls["cls"].float() / T, dim=-1)
            log_pt = F.log_softmax(lt["cls"].detach().float() / T, dim=-1)
            kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, K)
            if "obj" in lt:
                wgt = torch.sigmoid(lt["obj"].detach().float())
                cls_loss = (kl * wgt).sum() / wgt.sum().clamp_min(1e-6)
            else:
                cls_loss = kl.mean()
            add(self.cls_weight * cls_loss * T * T)
        if "box" in ls and "box" in lt and self.box_weight and ctx.targets is not None:
            add(self.box_weight * self.bounded_box_loss(ls["box"], lt["box"].detach(), ctx.targets))
        if total is None:
            raise ValueError("output_kd: the layout returned none of 'obj', 'cls', 'box' for both models")
        return total

    def bounded_box_loss(self, bs: torch.Tensor, bt: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher-bounded L2 regression (Chen et al. 2017) over teacher-matched predictions."""
        zero = bs.sum() * 0.0
        losses = []
        for b in range(bs.shape[0]):
            gt = targets[targets[:, 0] == b][:, 2:6].to(bs)
            if gt.numel() == 0:
                continue
            iou = box_iou(bt[b].float(), gt.float())
            best, idx = iou.max(dim=1)
            keep = best >= self.match_iou
            if not keep.any():
                continue
            y = gt[idx[keep]].float()
            wh = (y[:, 2:] - y[:, :2]).clamp_min(1.0).repeat(1, 2)
            ds = ((bs[b][keep].float() - y) / wh).pow(2).sum(-1)
            dt = ((bt[b][keep].float() - y) / wh).pow(2).sum(-1)
            active = (ds + self.margin > dt).float()
            losses.append((ds * active).sum() / keep.sum())
        if not losses:
            return zero
        return torch.stack(losses).mean()

    def _raw_kd(self, student, teacher) -> torch.Tensor:
        ss = list(student) if isinstance(student, (list, tuple)) else [student]
        tt = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        if len(ss) != len(tt):
            raise ValueError(f"output_kd: student gives {len(ss)} outputs, teacher {len(tt)}")
        terms = []
        for i, (s, t) in enumerate(zip(ss, tt)):
            if not (torch.is_tensor(s) and torch.is_tensor(t)) or s.shape != t.shape:
                raise ValueError(
                    f"output_kd: raw output {i} differs between student and teacher "
                    f"({getattr(s, 'shape', type(s))} vs {getattr(t, 'shape', type(t))}); give a "
                    "`layout` option or implement Detector.distill_outputs(raw)")
            terms.append(self.soft_bce(s, t))
        return torch.stack(terms).mean()
