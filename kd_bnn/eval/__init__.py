"""Evaluation: the official KITTI 2D protocol, COCO-style mAP, reports.

See `kd_bnn.eval.kitti` (devkit AP R11/R40), `kd_bnn.eval.coco` (pycocotools) and
`kd_bnn.eval.report` (tables, JSON, precision-recall plots).
"""

from kd_bnn.eval.kitti import (
    KittiEvalResult,
    detections_to_frame,
    evaluate_kitti,
    evaluate_kitti_dirs,
    write_kitti_results,
)

__all__ = [
    "KittiEvalResult", "detections_to_frame", "evaluate_kitti", "evaluate_kitti_dirs",
    "write_kitti_results",
]
