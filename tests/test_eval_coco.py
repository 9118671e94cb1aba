"""COCO-style evaluation through pycocotools on toy cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kd_bnn.data.kitti import FrameLabels
from kd_bnn.eval.coco import build_coco, evaluate_coco


def frame(objs, scores=None) -> FrameLabels:
    n = len(objs)
    return FrameLabels(
        types=np.array([o[0] for o in objs], dtype=object), truncated=np.zeros(n),
        occluded=np.zeros(n, dtype=np.int64), alpha=np.zeros(n),
        boxes=np.array([o[1] for o in objs], dtype=float).reshape(-1, 4), dims=np.zeros((n, 3)),
        loc=np.zeros((n, 3)), rotation_y=np.zeros(n),
        scores=None if scores is None else np.asarray(scores, dtype=float))


GT = {"000000": frame([("Car", [0, 0, 10, 10]), ("Car", [100, 0, 110, 10])])}
# d1 IoU .82 with the first car, d2 far from everything, d3 IoU .62 with the second car
DETS = {"000000": frame([("Car", [0, 0, 10, 8.2]), ("Car", [50, 50, 60, 60]),
                         ("Car", [100, 0, 110, 6.2])], scores=[0.9, 0.8, 0.7])}


def test_toy_case_by_hand():
    # IoU >= t for t <= .60: TP FP TP -> recall .5 .5 1, precision 1 .5 .667; interpolated
    # precision 1 on 51 of the 101 recall points (0..0.50), 2/3 on the other 50:
    # AP = (51 + 50 * 2/3) / 101. For .65 <= t <= .80 only d1: (51 * 1) / 101. t >= .85: 0.
    ap_lo = (51 + 50 * 2 / 3) / 101
    ap_mid = 51 / 101
    res = evaluate_coco(GT, DETS, classes=("Car",))
    assert res["AP50"] == pytest.approx(ap_lo * 100)
    assert res["mAP"] == pytest.approx((3 * ap_lo + 4 * ap_mid) / 10 * 100)
    assert res["per_class"]["Car"]["AP50"] == pytest.approx(ap_lo * 100)
    assert res["AP75"] == pytest.approx(ap_mid * 100)


def test_dontcare_and_neighbours_are_crowd_regions():
    gt = {"000000": frame([("Car", [0, 0, 10, 10]), ("DontCare", [200, 0, 300, 100]),
                           ("Van", [400, 0, 440, 30]), ("Truck", [500, 0, 540, 30])])}
    base = [("Car", [0, 0, 10, 10])]
    # a detection inside the DontCare region and one on the Van: ignored, AP stays 100
    dets = {"000000": frame(base + [("Car", [210, 10, 250, 50]), ("Car", [400, 0, 440, 30])],
                            scores=[0.5, 0.9, 0.8])}
    assert evaluate_coco(gt, dets, ("Car",))["AP50"] == pytest.approx(100.0)
    # on the Truck (not a neighbour of Car) it is a false positive ranked first
    dets = {"000000": frame(base + [("Car", [500, 0, 540, 30])], scores=[0.5, 0.9])}
    assert evaluate_coco(gt, dets, ("Car",))["AP50"] == pytest.approx((51 * 0.5 + 50 * 0.5) / 101 * 100)
    ds, _ = build_coco(gt, dets, ("Car", "Pedestrian"))
    crowd = [(a["category_id"], a["bbox"]) for a in ds["annotations"] if a["iscrowd"]]
    # DontCare for both classes, the Van for Car only
    assert sorted(crowd) == [(1, [200.0, 0.0, 100.0, 100.0]), (1, [400.0, 0.0, 40.0, 30.0]),
                             (2, [200.0, 0.0, 100.0, 100.0])]


def test_class_without_gt_is_nan_and_no_detections_zero(capsys):
    res = evaluate_coco(GT, DETS, classes=("Car", "Pedestrian"))
    assert np.isnan(res["per_class"]["Pedestrian"]["mAP"])
    assert res["mAP"] == pytest.approx(res["per_class"]["Car"]["mAP"])
    assert capsys.readouterr().out == ""  # pycocotools' prints are suppressed
    empty = evaluate_coco(GT, {}, classes=("Car",))
    assert empty["mAP"] == 0.0 and empty["AP50"] == 0.0
