"""Evaluate KITTI result files like the official devkit (2D boxes, AP R11/R40), optionally COCO mAP.

Example:
    python tools/eval.py --gt-dir ../shared/kitti/labels_trainval/label_2 --pred-dir runs/x/results \
        --split ../shared/kitti/ImageSets/val.txt --json runs/x/kitti.json --coco
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.data.kitti import KittiFormatError  # noqa: E402
from kd_bnn.eval.kitti import evaluate_kitti_dirs, load_kitti_dirs  # noqa: E402
from kd_bnn.eval.report import format_report, plot_pr_curves, save_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt-dir", required=True, help="ground-truth label_2 folder (15 fields per line)")
    ap.add_argument("--pred-dir", required=True, help="result folder: one <id>.txt per frame, 16 fields")
    ap.add_argument("--split", help="file of frame ids to evaluate (default: every label in --gt-dir)")
    ap.add_argument("--json", help="write {'bbox_2d': {...}} (and 'coco' with --coco) to this file")
    ap.add_argument("--strict", action="store_true", help="a missing result file is an error")
    ap.add_argument("--coco", action="store_true", help="also report pycocotools mAP@[.5:.95] and AP50")
    ap.add_argument("--plots", help="folder for precision-recall PNGs")
    ap.add_argument("--classes", default="Car,Pedestrian,Cyclist", help="comma-separated classes")
    args = ap.parse_args(argv)
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = evaluate_kitti_dirs(args.gt_dir, args.pred_dir, args.split, strict=args.strict,
                                      classes=classes)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        coco = None
        if args.coco:
            from kd_bnn.eval.coco import evaluate_coco

            gt, dets = load_kitti_dirs(args.gt_dir, args.pred_dir, args.split, strict=False)
            coco = evaluate_coco(gt, dets, classes)
    except (FileNotFoundError, KittiFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(res, coco))
    if args.json:
        save_json(args.json, res, coco)
        print(f"wrote {args.json}")
    if args.plots:
        for p in plot_pr_curves(res, args.plots):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
