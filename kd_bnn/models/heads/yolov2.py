"""YOLOv2 region head: decoding and loss of Darknet's ``[region]`` layer.

Redmon & Farhadi, "YOLO9000: Better, Faster, Stronger", CVPR 2017, Sec. 2 ("Direct location
prediction"): ``bx = cx + sigmoid(tx)``, ``bw = pw * exp(tw)``, objectness ``sigmoid(to)``,
class probabilities by softmax. Anchors ``pw, ph`` are given in grid cells (the ``anchors=`` of
a YOLOv2 cfg).

Loss choices (see `kd_bnn.models.heads.common` for the shared skeleton):

* coordinates: squared error on ``sigmoid(tx, ty)`` and on ``tw, th``, times
  ``coord_scale * (2 - w * h)``;
* objectness: squared error on ``sigmoid(to)``; positives go to the IoU of their predicted
  box with the truth (``rescore=True``, as ``rescore=1`` in the Darknet VOC cfgs) or to 1;
  ``object_scale=5``, ``noobject_scale=1``, ``ignore_thresh=0.6`` as in those cfgs;
* classes: softmax cross-entropy (``class_loss="ce"``), whose gradient w.r.t. the logits,
  ``p - onehot``, is exactly the delta Darknet's region layer back-propagates; or
  ``class_loss="mse"``, squared error on the softmax probabilities;
* the early-training "prior" term of Darknet (pulling every box to its anchor for the first
  12800 images) is not implemented: it only helps the first iterations of a from-scratch run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_bnn.models.heads.common import AnchorHead, mse_sigmoid, shape_iou

#: `RegionHead` keyword settings and their skeleton kinds (see `kd_bnn.models.detector.register_skeleton`).
REGION_HYPER_KINDS = {"coord_scale": "float", "object_scale": "float", "noobject_scale": "float",
                      "class_scale": "float", "ignore_thresh": "float", "rescore": "bool",
                      "dontcare_thresh": "float", "class_loss": "name"}


class RegionHead(AnchorHead):
    """Darknet ``[region]`` layer (YOLOv2) on a (B, A*(5+C), H, W) raw map.

    Args:
        anchors: (A, 2) anchor widths and heights in grid cells (YOLOv2 cfg convention).
        num_classes: C.
        stride: input pixels per grid cell (32 for YOLOv2).
        coord_scale, object_scale, noobject_scale, class_scale: term weights.
        ignore_thresh: predictions whose box has IoU above this with a truth are not negatives.
        rescore: objectness target of a positive is its IoU with the truth (else 1).
        dontcare_thresh: predictions covered by a DontCare box above this fraction are not negatives.
        class_loss: "ce" (softmax cross-entropy) or "mse" (squared error on probabilities).
    """

    def __init__(self, anchors: Sequence[Sequence[float]] | torch.Tensor, num_classes: int, stride: int = 32, *,
                 coord_scale: float = 1.0, object_scale: float = 5.0, noobject_scale: float = 1.0,
                 class_scale: float = 1.0, ignore_thresh: float = 0.6, rescore: bool = True,
                 dontcare_thresh: float = 0.5, class_loss: str = "ce"):
        super().__init__(num_classes, stride, coord_scale=coord_scale, object_scale=object_scale,
                         noobject_scale=noobject_scale, class_scale=class_scale,
                         ignore_thresh=ignore_thresh, rescore=rescore, dontcare_thresh=dontcare_thresh)
        anc = torch.as_tensor(anchors, dtype=torch.float32).reshape(-1, 2)
        if anc.shape[0] < 1 or (anc <= 0).any():
            raise ValueError(f"anchors: expected positive (w, h) pairs in grid cells, found {anc.tolist()}")
        if class_loss not in ("ce", "mse"):
            raise ValueError(f"class_loss: expected 'ce' or 'mse', found {class_loss!r}")
        self.class_loss = class_loss
        self.register_buffer("anchors_grid", anc, persistent=False)
        self.register_buffer("anchors_px", anc * float(stride), persistent=False)

    def assign_anchors(self, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each truth takes the anchor with the best shape IoU (Darknet ``bias_match``)."""
        a = shape_iou(wh, self.anchors_px.to(wh.dtype)).argmax(dim=1)
        return a, torch.ones_like(a, dtype=torch.bool)

    def xy_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_sigmoid(logits, target)

    def obj_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_sigmoid(logits, target)

    def cls_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.class_loss == "ce":
            return F.cross_entropy(logits, labels, reduction="none")
        onehot = F.one_hot(labels, self.num_classes).to(logits.dtype)
        return ((logits.softmax(-1) - onehot) ** 2).sum(-1)

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1)
