"""Evaluate KITTI result files like the official devkit (2D boxes, AP R11/R40), optionally COCO mAP,
or evaluate a trained model from its config and checkpoint.

Result-file mode:
    python tools/eval.py --gt-dir ../shared/kitti/labels_trainval/label_2 --pred-dir runs/x/results \
        --split ../shared/kitti/ImageSets/val.txt --json runs/x/kitti.json --coco

Model mode (writes KITTI result files, prints KITTI + COCO tables, the compression summary and,
for a student config, the teacher side by side):
    python tools/eval.py --config configs/kitti/darknet_yolov2_bwn_kt.yaml \
        --weights runs/kitti_darknet_yolov2_bwn_kt/best.pt [--out DIR] [--teacher-weights CKPT] \
        [--json OUT] [key=value ...]

Safety: --out is never the dataset's label, image or calib folder (nor inside one), and a
non-empty --out must be this tool's own earlier output (it holds a .kd_bnn_results marker and
only <id>.txt result files); a split listing a frame twice is refused; a missing --pred-dir, or
one without any result file, is an error unless --allow-empty-pred. Bad input exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Result-file mode imports neither torch nor matplotlib (a process start in ~0.2 s instead of
# seconds; tests/test_torch_free_eval.py): keep torch-using imports inside `_model_mode` and
# matplotlib inside `plot_pr_curves`.
from kd_bnn.data.kitti import KittiFormatError, read_split  # noqa: E402
from kd_bnn.eval.kitti import (  # noqa: E402
    RESULT_MARKER,
    EmptyResultsError,
    check_not_within,
    check_result_dir,
    evaluate_kitti_dirs,
    load_kitti_dirs,
    mark_result_dir,
)
from kd_bnn.eval.report import format_report, plot_pr_curves, save_json  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt-dir", help="result-file mode: ground-truth label_2 folder (15 fields per line)")
    ap.add_argument("--pred-dir", help="result-file mode: one <id>.txt per frame, 16 fields")
    ap.add_argument("--split", help="file of frame ids to evaluate (default: every label in --gt-dir)")
    ap.add_argument("--json", help="write {'bbox_2d': {...}} (and 'coco' with --coco) to this file")
    ap.add_argument("--strict", action="store_true", help="a missing result file is an error")
    ap.add_argument("--allow-empty-pred", action="store_true",
                    help="score a missing --pred-dir, or one without any result file, as frames without "
                         "detections (all AP 0) instead of failing")
    ap.add_argument("--coco", action="store_true", help="also report pycocotools mAP@[.5:.95] and AP50")
    ap.add_argument("--plots", help="folder for precision-recall PNGs")
    ap.add_argument("--classes", default="Car,Pedestrian,Cyclist", help="comma-separated classes")
    m = ap.add_argument_group("model mode")
    m.add_argument("--config", help="experiment YAML the checkpoint was trained with")
    m.add_argument("--weights", help="checkpoint to evaluate (runs/<name>/best.pt, or a teacher's "
                                     "Darknet .weights for a teacher-only config)")
    m.add_argument("--out", help="folder for the KITTI result files (default runs/<name>/eval/); must be "
                                 "new, empty or an earlier output of this tool, never a dataset folder")
    m.add_argument("--teacher-weights", help="teacher checkpoint shown beside a student "
                                             "(default: the config's teacher.weights)")
    m.add_argument("--no-teacher", action="store_true", help="do not evaluate the teacher of a student")
    m.add_argument("--no-coco", action="store_true", help="skip the COCO table")
    m.add_argument("--layers", action="store_true", help="print the per-layer compression table")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.batch_size=4")
    return ap


def _dataset_folders(root: str | Path) -> list[tuple[str, Path]]:
    """(description, folder) of the folders of a KITTI root that nothing may be written into,
    in both layouts the dataset accepts: ``root/training/<dir>`` and ``root/<dir>``."""
    root = Path(root)
    return [(desc, base / sub) for base in (root / "training", root)
            for sub, desc in (("label_2", "ground-truth label folder"), ("image_2", "image folder"),
                              ("calib", "calibration folder"))]


def _val_split_file(cfg) -> Path | None:
    """The id list the config's validation split reads (as `KittiDataset` resolves it), if present."""
    named = Path(cfg.data.root) / "ImageSets" / f"{cfg.data.val_split}.txt"
    if named.is_file():
        return named
    path = Path(cfg.data.val_split)
    return path if path.is_file() else None


def _remove_if_only_marker(folder: Path | None) -> None:
    """Undo `mark_result_dir` on a folder this run created when the run failed before writing."""
    if folder is None or not folder.is_dir():
        return
    if [p.name for p in folder.iterdir()] in ([], [RESULT_MARKER]):
        (folder / RESULT_MARKER).unlink(missing_ok=True)
        folder.rmdir()


def _model_mode(args: argparse.Namespace) -> int:
    from kd_bnn.config import ConfigError, load_config
    from kd_bnn.data.dataset import KittiDatasetError
    from kd_bnn.engine.checkpoint import CheckpointError
    from kd_bnn.engine.evaluate import evaluate_config, format_evaluation
    from kd_bnn.io import atomic_write_text

    created: Path | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        split = _val_split_file(cfg)
        if split is not None:  # before any work: a frame listed twice would count twice
            read_split(split)
        out = Path(args.out) if args.out else Path(cfg.output_dir) / cfg.name / "eval"
        protected = _dataset_folders(cfg.data.root)
        check_result_dir(out, protected)
        for flag, value in (("--json", args.json), ("--plots", args.plots)):
            if value:
                check_not_within(value, protected, flag)
        if not out.exists():
            created = out
        mark_result_dir(out)
        report = evaluate_config(cfg, args.weights, out, args.teacher_weights,
                                 with_teacher=not args.no_teacher, coco=not args.no_coco,
                                 progress=not args.no_progress and sys.stderr.isatty())
    except (ConfigError, FileNotFoundError, KittiDatasetError, KittiFormatError, CheckpointError,
            ValueError) as exc:
        _remove_if_only_marker(created)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        _remove_if_only_marker(created)
        raise
    print(format_evaluation(report, layers=args.layers))
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plots:
        for ev in (report.main, report.teacher):
            if ev is not None:
                for p in plot_pr_curves(ev.kitti, Path(args.plots) / ev.role):
                    print(f"wrote {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.config or args.weights:
        if not (args.config and args.weights):
            ap.error("model mode needs both --config and --weights")
        if args.gt_dir or args.pred_dir:
            ap.error("--gt-dir/--pred-dir (result files) and --config/--weights (a model) are exclusive")
        return _model_mode(args)
    if not (args.gt_dir and args.pred_dir):
        ap.error("the following arguments are required: --gt-dir, --pred-dir "
                 "(or --config and --weights to evaluate a model)")
    if args.overrides:
        ap.error(f"unrecognized arguments: {' '.join(args.overrides)} (key=value overrides need --config)")
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    try:
        protected = [("ground-truth label folder", args.gt_dir)]
        for flag, value in (("--json", args.json), ("--plots", args.plots)):
            if value:
                check_not_within(value, protected, flag)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = evaluate_kitti_dirs(args.gt_dir, args.pred_dir, args.split, strict=args.strict,
                                      classes=classes, allow_empty=args.allow_empty_pred)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        coco = None
        if args.coco:
            from kd_bnn.eval.coco import evaluate_coco

            gt, dets = load_kitti_dirs(args.gt_dir, args.pred_dir, args.split, strict=False,
                                       allow_empty=args.allow_empty_pred)
            coco = evaluate_coco(gt, dets, classes)
    except EmptyResultsError as exc:
        print(f"error: --pred-dir: {exc}; pass --allow-empty-pred to score it as frames without "
              "detections (all AP 0)", file=sys.stderr)
        return 2
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
