"""COCO-style mAP@[.5:.95] and AP50 of KITTI predictions through pycocotools.

Same inputs as `kd_bnn.eval.kitti.evaluate_kitti` (frame id -> `FrameLabels`). Protocol
(Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014; pycocotools' COCOeval, bbox):

* every ground-truth object of an evaluated class is a regular annotation, whatever its KITTI
  difficulty (COCO has no difficulty levels);
* ``DontCare`` regions become ``iscrowd`` annotations of *every* evaluated class, and the
  devkit's neighbouring classes (Van for Car, Person_sitting for Pedestrian) ``iscrowd``
  annotations of that class: as in the KITTI devkit, a detection there is neither a true nor a
  false positive (pycocotools matches crowd regions by intersection over detection area);
* other types (Truck, Tram, Misc, ...) are absent, so detections on them count as false positives;
* COCOeval defaults otherwise (10 IoU thresholds .50:.05:.95, 101 recall points, at most 100
  detections per image and class). Box widths are x2 - x1 (no +1 pixel).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np

from kd_bnn.data.kitti import DEFAULT_CLASSES, FrameLabels
from kd_bnn.eval.kitti import NEIGHBOUR


def _xywh(b: np.ndarray) -> list[float]:
    return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]


def build_coco(gt: Mapping[str, FrameLabels], dets: Mapping[str, FrameLabels],
               classes: Sequence[str] = DEFAULT_CLASSES) -> tuple[dict, list[dict]]:
    """The COCO ground-truth dataset dict and the detection list (see the module docstring)."""
    cat_id = {c.lower(): k + 1 for k, c in enumerate(classes)}
    crowd_of = {NEIGHBOUR[c]: c for c in cat_id if c in NEIGHBOUR}
    images, anns, results = [], [], []
    for img_id, (fid, fl) in enumerate(gt.items(), 1):
        images.append({"id": img_id, "file_name": f"{fid}.png"})
        for t, b in zip(fl.types, np.asarray(fl.boxes, dtype=np.float64).reshape(-1, 4)):
            t = str(t).lower()
            if t in cat_id:
                cats, crowd = [cat_id[t]], 0
            elif t in crowd_of:
                cats, crowd = [cat_id[crowd_of[t]]], 1
            elif t == "dontcare":
                cats, crowd = list(cat_id.values()), 1
            else:
                continue
            box = _xywh(b)
            for c in cats:
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": c, "bbox": box,
                             "area": max(box[2], 0.0) * max(box[3], 0.0), "iscrowd": crowd})
        d = dets.get(fid)
        if d is None or len(d) == 0:
            continue
        for t, b, s in zip(d.types, np.asarray(d.boxes, dtype=np.float64).reshape(-1, 4), d.scores):
            c = cat_id.get(str(t).lower())
            if c is not None:
                results.append({"image_id": img_id, "category_id": c, "bbox": _xywh(b),
                                "score": float(s)})
    dataset = {"images": images, "annotations": anns,
               "categories": [{"id": v, "name": classes[v - 1]} for v in cat_id.values()]}
    return dataset, results


def evaluate_coco(gt: Mapping[str, FrameLabels], dets: Mapping[str, FrameLabels],
                  classes: Sequence[str] = DEFAULT_CLASSES) -> dict:
    """pycocotools bbox evaluation: ``{"mAP", "AP50", "AP75", "per_class": {c: {"mAP", "AP50"}}}``.

    Values are in percent; a class without any ground truth has NaN AP (pycocotools' -1).
    pycocotools' own printing is suppressed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, results = build_coco(gt, dets, classes)
    nan = float("nan")
    if not results:
        has_gt = {a["category_id"] for a in dataset["annotations"] if not a["iscrowd"]}
        per = {c: {"mAP": 0.0 if k + 1 in has_gt else nan, "AP50": 0.0 if k + 1 in has_gt else nan}
               for k, c in enumerate(classes)}
        return {"mAP": 0.0 if has_gt else nan, "AP50": 0.0 if has_gt else nan,
                "AP75": 0.0 if has_gt else nan, "per_class": per}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"]  # (T, R, K, A, M); area 'all' = 0, maxDets 100 = last

    def _mean(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean() * 100.0) if p.size else nan

    per_class = {}
    for k, c in enumerate(classes):
        per_class[c] = {"mAP": _mean(prec[:, :, k, 0, -1]), "AP50": _mean(prec[0, :, k, 0, -1])}
    return {"mAP": _mean(prec[:, :, :, 0, -1]), "AP50": _mean(prec[0, :, :, 0, -1]),
            "AP75": _mean(prec[5, :, :, 0, -1]), "per_class": per_class}


__all__ = ["build_coco", "evaluate_coco"]
