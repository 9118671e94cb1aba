"""evaluate_model: predictions mapped back through the letterbox and scored by KITTI AP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kd_bnn.data.kitti import FrameLabels
from kd_bnn.engine import evaluate_model
from kd_bnn.models.detector import Detections

pytest.importorskip("kd_bnn.eval.kitti")
pytest.importorskip("kd_bnn.data.transforms")

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def _gt(box):
    return FrameLabels(types=np.array(["Car"], dtype=object), truncated=np.zeros(1), occluded=np.zeros(1, dtype=np.int64),
                       alpha=np.zeros(1), boxes=np.array([box], dtype=float), dims=np.ones((1, 3)),
                       loc=np.ones((1, 3)), rotation_y=np.zeros(1))


class Oracle(nn.Module):
    """Predicts given boxes (in input pixels) whatever the image."""

    def __init__(self, boxes_in_input, scores):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.boxes = boxes_in_input
        self.scores = scores

    def forward(self, images):
        return images

    def predict(self, raw, conf_thres=0.0, iou_thres=0.45, max_det=300):
        return [Detections(torch.tensor([b]), torch.tensor([s]), torch.tensor([0])) for b, s in zip(self.boxes, self.scores)]


def test_oracle_gets_full_ap_through_the_letterbox():
    gt = {f"{i:06d}": _gt([20.0 + 20 * i, 100.0, 120.0 + 20 * i, 200.0 + 2 * i]) for i in range(45)}
    scale, pad = 0.5, (0.0, 20.0)
    meta = [{"image_id": k, "orig_size": (375, 1242), "scale": scale, "pad": pad, "flipped": False} for k in gt]
    in_boxes = [[v.boxes[0][0] * scale + pad[0], v.boxes[0][1] * scale + pad[1],
                 v.boxes[0][2] * scale + pad[0], v.boxes[0][3] * scale + pad[1]] for v in gt.values()]
    scores = [0.99 - 0.01 * i for i in range(45)]  # >= 41 truths: the devkit samples 41 points
    loader = [(torch.zeros(45, 3, 8, 8), torch.zeros(0, 6), [torch.zeros(0, 4)] * 45, meta)]
    metrics, result = evaluate_model(Oracle(in_boxes, scores), loader, CLASSES, gt=gt)
    assert metrics["Car/moderate/R40"] == pytest.approx(100.0)
    assert metrics["Car/easy/R11"] == pytest.approx(100.0)
    assert metrics["mAP/moderate/R40"] == pytest.approx(100.0 / 3)  # no Pedestrian / Cyclist found
    # boxes left in input pixels (no mapping back) miss the ground truth
    loader2 = [(torch.zeros(45, 3, 8, 8), torch.zeros(0, 6), [torch.zeros(0, 4)] * 45,
                [dict(m, scale=1.0, pad=(0.0, 0.0)) for m in meta])]
    metrics2, _ = evaluate_model(Oracle(in_boxes, scores), loader2, CLASSES, gt=gt)
    assert metrics2["Car/moderate/R40"] < 50


def test_pr_curve_plot(tmp_path):
    from kd_bnn.engine.plots import plot_pr_curves

    gt = {f"{i:06d}": _gt([20.0 + 20 * i, 100.0, 120.0 + 20 * i, 200.0]) for i in range(5)}
    meta = [{"image_id": k, "orig_size": (375, 1242), "scale": 1.0, "pad": (0.0, 0.0), "flipped": False} for k in gt]
    boxes = [list(v.boxes[0]) for v in gt.values()]
    loader = [(torch.zeros(5, 3, 8, 8), torch.zeros(0, 6), [torch.zeros(0, 4)] * 5, meta)]
    _, result = evaluate_model(Oracle(boxes, [0.9, 0.8, 0.7, 0.6, 0.5]), loader, CLASSES, gt=gt)
    out = plot_pr_curves(result, tmp_path / "pr.png")
    assert out.stat().st_size > 1000
