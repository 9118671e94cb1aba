"""YOLOv3 head: decoding and loss of Darknet's ``[yolo]`` layer.

Redmon & Farhadi, "YOLOv3: An Incremental Improvement", arXiv 1804.02767 (2018): the box is
decoded as in YOLOv2, with anchors in input pixels; objectness and every class are independent
sigmoids (multi-label). Each truth is matched to the single best anchor over *all* scales by
shape IoU; a head only trains the truths whose best anchor is in its ``mask``. Predictions
overlapping a truth above ``ignore_thresh`` (0.5 in the paper, 0.7 in the Darknet cfgs — the
default here) are ignored in the no-object term.

Loss choices (see `kd_bnn.models.heads.common` for the shared skeleton): binary cross-entropy
with logits for ``tx, ty`` (against the offset in the cell), objectness and classes — its
gradient ``sigmoid - target`` is the delta Darknet's yolo layer back-propagates — and squared
error on ``tw, th``, all coordinates weighted by ``2 - w * h``; all scales 1, no rescoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_bnn.models.heads.common import AnchorHead, bce_logits, shape_iou


class YoloHead(AnchorHead):
    """Darknet ``[yolo]`` layer (YOLOv3) on a (B, len(mask)*(5+C), H, W) raw map.

    Args:
        anchors_px: (K, 2) all anchors of the network (every scale), w, h in input pixels.
        mask: indices into `anchors_px` of this head's anchors.
        num_classes: C.
        stride: input pixels per grid cell of this scale.
        ignore_thresh: predictions with IoU above this with a truth are not negatives.
        dontcare_thresh: predictions covered by a DontCare box above this fraction are not negatives.
        coord_scale, object_scale, noobject_scale, class_scale: term weights (1 in Darknet).
        rescore: objectness target of a positive is its IoU with the truth (else 1).
    """

    def __init__(self, anchors_px: Sequence[Sequence[float]] | torch.Tensor, mask: Sequence[int],
                 num_classes: int, stride: int, *, ignore_thresh: float = 0.7, dontcare_thresh: float = 0.5,
                 coord_scale: float = 1.0, object_scale: float = 1.0, noobject_scale: float = 1.0,
                 class_scale: float = 1.0, rescore: bool = False):
        super().__init__(num_classes, stride, coord_scale=coord_scale, object_scale=object_scale,
                         noobject_scale=noobject_scale, class_scale=class_scale,
                         ignore_thresh=ignore_thresh, rescore=rescore, dontcare_thresh=dontcare_thresh)
        all_anc = torch.as_tensor(anchors_px, dtype=torch.float32).reshape(-1, 2)
        if all_anc.shape[0] < 1 or (all_anc <= 0).any():
            raise ValueError(f"anchors_px: expected positive (w, h) pairs in pixels, found {all_anc.tolist()}")
        mask = [int(m) for m in mask]
        if not mask or len(set(mask)) != len(mask) or min(mask) < 0 or max(mask) >= all_anc.shape[0]:
            raise ValueError(f"mask: expected distinct indices into the {all_anc.shape[0]} anchors, found {mask}")
        self.mask = mask
        self.register_buffer("all_anchors_px", all_anc, persistent=False)
        self.register_buffer("anchors_px", all_anc[mask].clone(), persistent=False)
        lookup = torch.full((all_anc.shape[0],), -1, dtype=torch.long)
        lookup[torch.tensor(mask)] = torch.arange(len(mask))
        self.register_buffer("_local", lookup, persistent=False)

    def assign_anchors(self, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best anchor over every scale; only truths whose best anchor is in `mask` are handled here."""
        best = shape_iou(wh, self.all_anchors_px.to(wh.dtype)).argmax(dim=1)
        local = self._local.to(wh.device)[best]
        return local.clamp(min=0), local >= 0

    def xy_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_logits(logits, target)

    def obj_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_logits(logits, target)

    def cls_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(logits.dtype)
        return bce_logits(logits, onehot).sum(-1)

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()
