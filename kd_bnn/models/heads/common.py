"""Pieces shared by the anchor-based YOLO heads: box helpers, the common loss skeleton, NMS.

The loss skeleton (`AnchorHead.loss`) follows Darknet's region / yolo layers (Redmon &
Farhadi, YOLO9000, CVPR 2017; YOLOv3, arXiv 1804.02767):

* every ground-truth box is assigned to the cell holding its centre and to its best anchor by
  IoU of shapes (both boxes centred at the origin);
* that prediction regresses ``sigmoid(tx, ty)`` to the centre offset in the cell and
  ``tw, th`` to ``log(w / anchor_w), log(h / anchor_h)``, weighted by ``2 - w * h`` (w, h as
  fractions of the input) so that small boxes weigh more;
* its objectness goes to 1 (or to the IoU of the predicted box with the truth, ``rescore``),
  its class to the truth class;
* every other prediction has objectness pushed to 0, unless its box overlaps some truth with
  IoU > ``ignore_thresh`` (it is then neither positive nor negative), or it lies in a DontCare
  region: the fraction of its area covered by a DontCare box exceeds ``dontcare_thresh``
  (0.5 — the same overlap test the KITTI devkit uses to ignore detections in DontCare areas).

The terms are sums over predictions divided by the batch size (loss per image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou

from kd_bnn.models.detector import Detections

#: Upper bound on the exponent of exp(tw), exp(th) when decoding (keeps random nets finite).
MAX_LOG_WH = 10.0


def shape_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of box shapes with a common centre: (N, 2) x (K, 2) -> (N, K)."""
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(wh1[:, None, 1], wh2[None, :, 1])
    union = (wh1[:, 0] * wh1[:, 1])[:, None] + (wh2[:, 0] * wh2[:, 1])[None, :] - inter
    return inter / union.clamp(min=1e-12)


def box_ioa(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over the area of `a`: (N, 4) x (M, 4) xyxy -> (N, M)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).clamp(min=1e-12)
    return inter / area[:, None]


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two (N, 4) xyxy tensors -> (N,)."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


def check_targets(targets: torch.Tensor | None, batch_size: int, input_size: tuple[int, int],
                  device: torch.device) -> torch.Tensor:
    """Validate (N, 6) targets ``(image_index, class, x1, y1, x2, y2)``; clip boxes to the input and
    drop boxes with no area left. Returns a float tensor on `device`."""
    if targets is None:
        return torch.zeros((0, 6), device=device)
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets, dtype=torch.float32)
    if targets.numel() == 0:
        return torch.zeros((0, 6), device=device)
    if targets.ndim != 2 or targets.shape[1] != 6:
        raise ValueError(
            "targets: expected an (N, 6) tensor of rows (image_index, class, x1, y1, x2, y2), "
            f"found shape {tuple(targets.shape)}"
        )
    t = targets.to(device=device, dtype=torch.float32).clone()
    idx = t[:, 0]
    if (idx < 0).any() or (idx >= batch_size).any() or (idx != idx.round()).any():
        raise ValueError(f"targets: image_index must be an integer in [0, {batch_size - 1}], "
                         f"found {sorted(set(idx.tolist()))}")
    h, w = input_size
    t[:, [2, 4]] = t[:, [2, 4]].clamp(0, w)
    t[:, [3, 5]] = t[:, [3, 5]].clamp(0, h)
    keep = (t[:, 4] > t[:, 2]) & (t[:, 5] > t[:, 3])
    return t[keep]


def check_input_size(input_size: Sequence[int], stride: int) -> tuple[int, int]:
    """(height, width) as ints, or a ValueError naming the nearest valid sizes (multiples of `stride`)."""
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size: expected (height, width), found {input_size!r}") from None
    if h <= 0 or w <= 0 or h % stride or w % stride:
        def near(v: int) -> str:
            lo = max(stride, v // stride * stride)
            return f"{lo} or {lo + stride}" if lo != v else str(v)
        raise ValueError(
            f"input_size {h}x{w}: height and width must be positive multiples of the network stride "
            f"{stride} (e.g. {near(h)} for the height, {near(w)} for the width)"
        )
    return h, w


class AnchorHead(nn.Module):
    """Loss and decoding common to the YOLOv2 region head and the YOLOv3 yolo head.

    Subclasses set ``anchors_px`` (this head's anchors, (A, 2) w, h in input pixels, a
    non-persistent buffer so state dicts and Darknet weights are unaffected) and define how
    truths pick anchors and which per-term losses are used.

    Raw map layout (Darknet's): (B, A * (5 + C), H, W), per anchor ``tx, ty, tw, th, to`` then
    C class logits. Predictions are flattened anchor-major: index ``(a * H + y) * W + x``.
    """

    def __init__(self, num_classes: int, stride: int, *, coord_scale: float = 1.0,
                 object_scale: float = 1.0, noobject_scale: float = 1.0, class_scale: float = 1.0,
                 ignore_thresh: float = 0.5, rescore: bool = False, dontcare_thresh: float = 0.5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: expected at least 1, found {num_classes}")
        self.num_classes = int(num_classes)
        self.stride = int(stride)
        self.coord_scale = float(coord_scale)
        self.object_scale = float(object_scale)
        self.noobject_scale = float(noobject_scale)
        self.class_scale = float(class_scale)
        self.ignore_thresh = float(ignore_thresh)
        self.rescore = bool(rescore)
        self.dontcare_thresh = float(dontcare_thresh)

    anchors_px: torch.Tensor

    # -- to be defined by subclasses -------------------------------------------------------
    def assign_anchors(self, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best anchor of each truth shape (G, 2) px -> (local anchor index (G,), handled here (G,))."""
        raise NotImplementedError(f"{type(self).__name__} must implement assign_anchors")

    def xy_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement xy_loss")

    def obj_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement obj_loss")

    def cls_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement cls_loss")

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement class_probs")

    # -- shared ----------------------------------------------------------------------------
    @property
    def num_anchors(self) -> int:
        return int(self.anchors_px.shape[0])

    @property
    def channels(self) -> int:
        """Channels of the raw map this head reads: A * (5 + C)."""
        return self.num_anchors * (5 + self.num_classes)

    def extra_repr(self) -> str:
        return f"anchors={self.num_anchors}, classes={self.num_classes}, stride={self.stride}"

    def split(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, A*(5+C), H, W) -> (B, A, H, W, 5+C), checking the channel count."""
        if raw.ndim != 4 or raw.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__}: expected a raw map (B, {self.channels}, H, W) = "
                f"{self.num_anchors} anchors x (5 + {self.num_classes} classes), found {tuple(raw.shape)}"
            )
        b, _, h, w = raw.shape
        return raw.view(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)

    def grid_scale(self, raw: torch.Tensor, input_size: Sequence[int] | None) -> tuple[int, int, float, float]:
        """Input (h, w) and pixels per cell (sx, sy); checks the map size against the stride."""
        h, w = raw.shape[-2:]
        if input_size is None:
            return h * self.stride, w * self.stride, float(self.stride), float(self.stride)
        in_h, in_w = int(input_size[0]), int(input_size[1])
        if in_h != h * self.stride or in_w != w * self.stride:
            raise ValueError(
                f"{type(self).__name__}: a {h}x{w} map at stride {self.stride} means an input of "
                f"{h * self.stride}x{w * self.stride}, but input_size is {in_h}x{in_w}"
            )
        return in_h, in_w, in_w / w, in_h / h

    def _boxes(self, p: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
        """Decoded xyxy boxes in input pixels (B, A, H, W, 4) from split predictions."""
        _, a, h, w, _ = p.shape
        gy, gx = torch.meshgrid(torch.arange(h, device=p.device, dtype=p.dtype),
                                torch.arange(w, device=p.device, dtype=p.dtype), indexing="ij")
        cx = (gx + p[..., 0].sigmoid()) * sx
        cy = (gy + p[..., 1].sigmoid()) * sy
        anc = self.anchors_px.to(p.dtype).view(1, a, 1, 1, 2)
        bw = p[..., 2].clamp(max=MAX_LOG_WH).exp() * anc[..., 0]
        bh = p[..., 3].clamp(max=MAX_LOG_WH).exp() * anc[..., 1]
        return torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), dim=-1)

    def decode(self, raw: torch.Tensor, input_size: Sequence[int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw map -> (boxes xyxy (B, N, 4) in input pixels, objectness (B, N), class probs (B, N, C)).

        Box centre = (cell + sigmoid(tx, ty)) * stride, size = anchor * exp(tw, th); N = A * H * W.
        """
        p = self.split(raw)
        _, _, sx, sy = self.grid_scale(raw, input_size)
        b = p.shape[0]
        boxes = self._boxes(p, sx, sy).reshape(b, -1, 4)
        obj = p[..., 4].sigmoid().reshape(b, -1)
        cls = self.class_probs(p[..., 5:]).reshape(b, -1, self.num_classes)
        return boxes, obj, cls

    def loss(self, raw: torch.Tensor, targets: torch.Tensor | None,
             ignore: Sequence[torch.Tensor] | None = None, input_size: Sequence[int] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Detection loss of one head; see the module docstring for the terms.

        Args:
            raw: (B, A*(5+C), H, W) raw map.
            targets: (N, 6) rows ``(image_index, class, x1, y1, x2, y2)`` in input pixels.
            ignore: per image an (M, 4) tensor of DontCare boxes in input pixels, or None.
            input_size: (h, w) of the input; defaults to the map size times the stride.

        Returns:
            (total, {"box", "obj", "cls"}): sums divided by the batch size.
        """
        p = self.split(raw)
        bsz, na, gh, gw, _ = p.shape
        in_h, in_w, sx, sy = self.grid_scale(raw, input_size)
        dev = raw.device
        t = check_targets(targets, bsz, (in_h, in_w), dev)
        if t.shape[0] and ((t[:, 1] < 0) | (t[:, 1] >= self.num_classes) | (t[:, 1] != t[:, 1].round())).any():
            raise ValueError(f"targets: class must be an integer in [0, {self.num_classes - 1}], "
                             f"found {sorted(set(t[:, 1].tolist()))}")
        if ignore is not None and len(ignore) != bsz:
            raise ValueError(f"ignore: expected one tensor of DontCare boxes per image ({bsz}), found {len(ignore)}")

        boxes = self._boxes(p, sx, sy)
        flat_boxes = boxes.detach().reshape(bsz, -1, 4)
        noobj = torch.ones(bsz, na * gh * gw, dtype=torch.bool, device=dev)
        for b in range(bsz):
            gt = t[t[:, 0] == b, 2:6]
            if gt.shape[0]:
                best = box_iou(flat_boxes[b], gt).max(dim=1).values
                noobj[b] &= ~(best > self.ignore_thresh)
            if ignore is not None and ignore[b] is not None and len(ignore[b]):
                dc = torch.as_tensor(ignore[b], dtype=flat_boxes.dtype, device=dev).reshape(-1, 4)
                cover = box_ioa(flat_boxes[b], dc).max(dim=1).values
                noobj[b] &= ~(cover > self.dontcare_thresh)

        zero = raw.sum() * 0.0
        box_l, cls_l, obj_pos = zero, zero, zero
        if t.shape[0]:
            cx = (t[:, 2] + t[:, 4]) / 2
            cy = (t[:, 3] + t[:, 5]) / 2
            wh = torch.stack((t[:, 4] - t[:, 2], t[:, 5] - t[:, 3]), dim=1)
            a_idx, mine = self.assign_anchors(wh)
            gi = (cx / sx).floor().clamp(0, gw - 1).long()
            gj = (cy / sy).floor().clamp(0, gh - 1).long()
            bi = t[:, 0].long()
            slot = ((bi * na + a_idx) * gh + gj) * gw + gi
            sel = torch.nonzero(mine).squeeze(1)
            if sel.numel():
                # Two truths on one (cell, anchor): the later one wins, as in Darknet.
                uniq, inv = torch.unique(slot[sel], return_inverse=True)
                last = torch.full((uniq.numel(),), -1, dtype=torch.long, device=dev)
                last = last.scatter_reduce(0, inv, torch.arange(sel.numel(), device=dev), reduce="amax")
                sel = sel[last]
                slot = slot[sel]
                noobj.view(-1)[slot] = False
                pp = p.reshape(-1, p.shape[-1])[slot]
                pbox = boxes.reshape(-1, 4)[slot]
                a_sel = a_idx[sel]
                anc = self.anchors_px.to(pp.dtype)[a_sel]
                txy = torch.stack((cx[sel] / sx - gi[sel], cy[sel] / sy - gj[sel]), dim=1)
                twh = torch.log(wh[sel] / anc)
                weight = 2.0 - (wh[sel, 0] / in_w) * (wh[sel, 1] / in_h)
                coord = self.xy_loss(pp[:, 0:2], txy).sum(1) + ((pp[:, 2:4] - twh) ** 2).sum(1)
                box_l = self.coord_scale * (weight * coord).sum()
                if self.rescore:
                    obj_t = pairwise_iou(pbox.detach(), t[sel, 2:6]).clamp(0, 1)
                else:
                    obj_t = torch.ones(sel.numel(), device=dev, dtype=pp.dtype)
                obj_pos = self.object_scale * self.obj_loss(pp[:, 4], obj_t).sum()
                cls_l = self.class_scale * self.cls_loss(pp[:, 5:], t[sel, 1].long()).sum()
        neg_logits = p[..., 4].reshape(bsz, -1)[noobj]
        obj_neg = self.noobject_scale * self.obj_loss(neg_logits, torch.zeros_like(neg_logits)).sum()
        parts = {"box": box_l / bsz, "obj": (obj_pos + obj_neg) / bsz, "cls": cls_l / bsz}
        return parts["box"] + parts["obj"] + parts["cls"], parts


def postprocess(boxes: torch.Tensor, scores: torch.Tensor, objectness: torch.Tensor | None = None,
                conf_thres: float = 0.005, iou_thres: float = 0.45, max_det: int = 300,
                input_size: Sequence[int] | None = None, multi_label: bool = True,
                max_candidates: int = 30000) -> list[Detections]:
    """Threshold, class-wise NMS (``torchvision.ops.batched_nms``) and clip, per image.

    Args:
        boxes: (B, N, 4) xyxy in input pixels.
        scores: (B, N, C) class probabilities (multiplied by `objectness` when given) or final
            per-class scores.
        objectness: (B, N) or None.
        conf_thres: keep (box, class) pairs scoring above this.
        iou_thres: NMS IoU threshold, per class.
        max_det: detections kept per image, best first.
        input_size: (h, w); boxes are clipped to it when given.
        multi_label: every class above the threshold gives a candidate (as Darknet does);
            False keeps only each box's best class.
        max_candidates: cap on candidates entering NMS (highest scores kept).
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected (B, N, 4), found {tuple(boxes.shape)}")
    if scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"scores: expected (B, N, C) with B, N = {tuple(boxes.shape[:2])}, found {tuple(scores.shape)}")
    if objectness is not None:
        scores = scores * objectness.unsqueeze(-1)
    out: list[Detections] = []
    for b in range(boxes.shape[0]):
        bx, sc = boxes[b].float(), scores[b].float()
        if input_size is not None:
            h, w = float(input_size[0]), float(input_size[1])
            bx = torch.stack((bx[:, 0].clamp(0, w), bx[:, 1].clamp(0, h),
                              bx[:, 2].clamp(0, w), bx[:, 3].clamp(0, h)), dim=1)
        if multi_label:
            i, c = torch.nonzero(sc > conf_thres, as_tuple=True)
            s = sc[i, c]
        else:
            s, c = sc.max(dim=1)
            i = torch.nonzero(s > conf_thres).squeeze(1)
            s, c = s[i], c[i]
        bx = bx[i]
        ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1]) & torch.isfinite(bx).all(1)
        bx, s, c = bx[ok], s[ok], c[ok]
        if s.numel() > max_candidates:
            top = s.topk(max_candidates).indices
            bx, s, c = bx[top], s[top], c[top]
        keep = batched_nms(bx, s, c, iou_thres)[:max_det]
        out.append(Detections(bx[keep], s[keep], c[keep].long()))
    return out


def decode_heads(heads: Sequence[AnchorHead], raws: Sequence[torch.Tensor], input_size: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode several heads and concatenate along the prediction axis."""
    if len(heads) != len(raws):
        raise ValueError(f"expected one raw map per head ({len(heads)}), found {len(raws)}")
    parts = [h.decode(r, input_size) for h, r in zip(heads, raws)]
    return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))  # type: ignore[return-value]


def predict_heads(heads: Sequence[AnchorHead], raws: Sequence[torch.Tensor], input_size: Sequence[int],
                  conf_thres: float = 0.005, iou_thres: float = 0.45, max_det: int = 300,
                  multi_label: bool = True) -> list[Detections]:
    """Decode every head, score = objectness x class probability, NMS: one `Detections` per image."""
    boxes, obj, cls = decode_heads(heads, raws, input_size)
    return postprocess(boxes, cls, obj, conf_thres, iou_thres, max_det, input_size, multi_label)


def heads_loss(heads: Sequence[AnchorHead], raws: Sequence[torch.Tensor], targets: torch.Tensor | None,
               ignore: Sequence[torch.Tensor] | None = None, input_size: Sequence[int] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the heads' losses (each YOLOv3 head handles only the truths of its anchor mask)."""
    if len(heads) != len(raws):
        raise ValueError(f"expected one raw map per head ({len(heads)}), found {len(raws)}")
    total = None
    parts: dict[str, torch.Tensor] = {}
    for h, r in zip(heads, raws):
        tot, pr = h.loss(r, targets, ignore, input_size)
        total = tot if total is None else total + tot
        for k, v in pr.items():
            parts[k] = parts[k] + v if k in parts else v
    if total is None:
        raise ValueError("heads_loss: no heads given")
    return total, parts


def mse_sigmoid(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error on sigmoid outputs (YOLOv2's region layer)."""
    return (logits.sigmoid() - target) ** 2


def bce_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits; its gradient ``sigmoid - target`` is Darknet's yolo delta."""
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")


def anchor_heads_outputs(heads: Sequence[AnchorHead], raws: Sequence[torch.Tensor],
                         input_size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Per-prediction view of anchor heads for output-level distillation (`Detector.distill_outputs`):
    ``obj`` (B, K) and ``cls`` (B, K, C) logits from ``split``, ``box`` (B, K, 4) from ``decode``,
    concatenated over heads."""
    raws = list(raws) if isinstance(raws, (list, tuple)) else [raws]
    if len(raws) != len(heads):
        raise ValueError(f"expected one raw map per head ({len(heads)}), found {len(raws)}")
    obj, cls, box = [], [], []
    for h, r in zip(heads, raws):
        p = h.split(r)
        b = p.shape[0]
        obj.append(p[..., 4].reshape(b, -1))
        cls.append(p[..., 5:].reshape(b, -1, p.shape[-1] - 5))
        box.append(h.decode(r, input_size)[0])
    return {"obj": torch.cat(obj, 1), "cls": torch.cat(cls, 1), "box": torch.cat(box, 1)}


def anchor_heads_objectness(heads: Sequence[AnchorHead], raws: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per head, the (B, H, W) objectness probability ``sigmoid(to)``, max over anchors
    (`Detector.objectness_maps`)."""
    raws = list(raws) if isinstance(raws, (list, tuple)) else [raws]
    return [torch.sigmoid(h.split(r.detach())[..., 4].float()).amax(dim=1) for h, r in zip(heads, raws)]


class AnchorHeadsMixin:
    """`Detector` hooks for families whose raw maps come from anchor heads: list them in
    ``anchor_heads()`` and output-level distillation and object-region masks work unchanged.
    Put it before `Detector` in the bases."""

    input_size: tuple[int, int]

    def anchor_heads(self) -> list[AnchorHead]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must list its anchor heads")

    def distill_outputs(self, raw) -> dict[str, torch.Tensor]:
        return anchor_heads_outputs(self.anchor_heads(), raw, getattr(self, "input_size", None))

    def objectness_maps(self, raw) -> list[torch.Tensor]:
        return anchor_heads_objectness(self.anchor_heads(), raw)
