"""Evaluate KITTI result files like the official devkit (2D boxes, AP R11/R40), optionally COCO mAP,
or evaluate a trained model: a kd_bnn checkpoint or a .kdbnn file.

Result-file mode:
    kd-bnn val --gt-dir ../shared/kitti/labels_trainval/label_2 --pred-dir runs/x/results \\
        --split ../shared/kitti/ImageSets/val.txt --json runs/x/kitti.json --coco

Model mode (writes KITTI result files, prints KITTI + COCO tables, the compression summary and,
for a student, the teacher side by side):
    kd-bnn val --model runs/kitti_darknet_yolov2_bwn_kt/best.pt [--config CONFIG] [--out DIR] \\
        [--teacher-weights CKPT] [--json OUT] [key=value ...]
  --model is a kd_bnn training checkpoint (its stored config is used unless --config is given;
  key=value overrides apply on top of either; a run's teacher/best.pt is evaluated as the
  teacher), or a .kdbnn: the packed runtime is scored on the val split of --config (required: a
  .kdbnn is data, the paths it records are never opened). `model=PATH` among the
  overrides is the same as --model; --weights is its old name (a teacher's Darknet .weights
  needs --config).
  (python tools/eval.py takes the same arguments.)

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
from contextlib import contextmanager
from pathlib import Path

# Result-file mode imports neither torch nor matplotlib (a process start in ~0.2 s instead of
# seconds; tests/test_torch_free_eval.py): keep torch-using imports inside `_model_mode` and
# matplotlib inside `plot_pr_curves`.
from kd_bnn.cli.common import is_kdbnn, one_model, parser, split_model_override
from kd_bnn.data.kitti import KittiFormatError, read_split
from kd_bnn.eval.kitti import (
    RESULT_MARKER,
    EmptyResultsError,
    check_not_within,
    check_result_dir,
    evaluate_kitti_dirs,
    load_kitti_dirs,
    mark_result_dir,
)
from kd_bnn.eval.report import format_report, plot_pr_curves, save_json


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = parser(__doc__, prog)
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
    m.add_argument("--model", help="kd_bnn training checkpoint (runs/<name>/best.pt) or .kdbnn file")
    m.add_argument("--weights", help="old name of --model (also: a teacher's Darknet .weights with --config)")
    m.add_argument("--config", help="experiment YAML (default: the config stored in the checkpoint)")
    m.add_argument("--out", help="folder for the KITTI result files (default runs/<name>/eval/); must be "
                                 "new, empty or an earlier output of this tool, never a dataset folder")
    m.add_argument("--teacher-weights", help="teacher checkpoint shown beside a student "
                                             "(default: the config's teacher.weights)")
    m.add_argument("--no-teacher", action="store_true", help="do not evaluate the teacher of a student")
    m.add_argument("--no-coco", action="store_true", help="skip the COCO table")
    m.add_argument("--layers", action="store_true", help="print the per-layer compression table")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.batch_size=4 "
                                                "(model=PATH: the same as --model)")
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a model evaluation reports as one ``error:`` line (imported late: they pull torch)."""
    from kd_bnn.config import ConfigError
    from kd_bnn.data.dataset import KittiDatasetError
    from kd_bnn.deploy.format import FormatError
    from kd_bnn.engine.checkpoint import CheckpointError

    return (ConfigError, FileNotFoundError, KittiDatasetError, KittiFormatError, CheckpointError, FormatError,
            OSError, ValueError)


@contextmanager
def _out_created_here():
    """``with _out_created_here() as made: ... made[0] = <the --out folder this run created>``: if the
    block fails, that folder is removed again when it holds nothing but this tool's marker."""
    made: list[Path | None] = [None]
    try:
        yield made
    except BaseException:
        _remove_if_only_marker(made[0])
        raise


def _prepare_out(args: argparse.Namespace, cfg) -> tuple[Path, Path | None]:
    """Check the split, --out, --json and --plots of a model evaluation; mark --out as this
    tool's output. Returns (out, the folder when this call created it)."""
    split = _val_split_file(cfg)
    if split is not None:  # before any work: a frame listed twice would count twice
        read_split(split)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / cfg.name / "eval"
    protected = _dataset_folders(cfg.data.root)
    check_result_dir(out, protected)
    for flag, value in (("--json", args.json), ("--plots", args.plots)):
        if value:
            check_not_within(value, protected, flag)
    created = None if out.exists() else out
    mark_result_dir(out)
    return out, created


def _checkpoint_config(args: argparse.Namespace, model: str):
    """The config to evaluate checkpoint `model` with; a run's float teacher-phase checkpoint
    read with its stored (student) config is evaluated as the teacher."""
    from kd_bnn.cli.common import config_for_model, teacher_phase_config

    cfg, _ = config_for_model(args.config, args.overrides, model)
    if args.config is None:
        cfg, note = teacher_phase_config(cfg, model)
        if note:
            print(note)
    return cfg


def _model_mode(args: argparse.Namespace, model: str) -> int:
    from kd_bnn.engine.evaluate import evaluate_config, format_evaluation
    from kd_bnn.io import atomic_write_text

    if is_kdbnn(model):
        return _kdbnn_mode(args, model)
    try:
        with _out_created_here() as made:
            cfg = _checkpoint_config(args, model)
            out, made[0] = _prepare_out(args, cfg)
            report = evaluate_config(cfg, model, out, args.teacher_weights,
                                     with_teacher=not args.no_teacher, coco=not args.no_coco,
                                     progress=not args.no_progress and sys.stderr.isatty())
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


def _kdbnn_config(args: argparse.Namespace, runtime):
    """The config whose val split scores a .kdbnn: --config (required). A .kdbnn is data: the
    checkpoint and config paths its metadata records are shown as a hint, never opened."""
    from kd_bnn.cli.common import config_for_model
    from kd_bnn.config import ConfigError

    if args.config is not None:
        return config_for_model(args.config, args.overrides, None)[0]
    src = runtime.meta.get("source") or {}
    recorded = ", ".join(f"{k} {v}" for k, v in (("config", src.get("config")), ("checkpoint", src.get("checkpoint")))
                         if isinstance(v, str))
    hint = f" (it records having been exported from {recorded})" if recorded else ""
    raise ConfigError(f"{runtime.path}: evaluating a .kdbnn needs the data to score it on: pass --config "
                      f"CONFIG (its data.root and data.val_split are used){hint}, or evaluate the training "
                      "checkpoint instead (--model runs/<name>/best.pt)")


def _kdbnn_mode(args: argparse.Namespace, model: str) -> int:
    """Score the packed runtime of a .kdbnn on a config's val split: result files, KITTI (and
    COCO) tables read back from them, as the checkpoint mode does."""
    from kd_bnn.cli.common import backend_line
    from kd_bnn.deploy.runtime import Runtime

    if args.teacher_weights or args.layers:
        print("error: --teacher-weights and --layers apply to a checkpoint, not a .kdbnn", file=sys.stderr)
        return 2
    try:
        with _out_created_here() as made:
            rt = Runtime(model)
            cfg = _kdbnn_config(args, rt)
            if list(rt.class_names) != list(cfg.data.classes):
                raise ValueError(f"{model} detects {rt.class_names}, but the config's data.classes are "
                                 f"{list(cfg.data.classes)}: pass the config it was trained with (--config)")
            if tuple(cfg.data.input_size) != tuple(rt.input_size):
                print(f"note: {model} runs at input size {list(rt.input_size)} (height, width); "
                      f"data.input_size {list(cfg.data.input_size)} is not used")
                cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"input_size": tuple(rt.input_size)})})
            out, made[0] = _prepare_out(args, cfg)
            kitti, coco, n = _score_runtime(rt, cfg, out, coco=not args.no_coco,
                                            progress=not args.no_progress and sys.stderr.isatty())
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(backend_line(rt.backend))
    print(f"{rt}: {n} frames, {rt.file_bytes:,} B file -> {out}")
    print(format_report(kitti, coco))
    if args.json:
        save_json(args.json, kitti, coco)
        print(f"wrote {args.json}")
    if args.plots:
        for p in plot_pr_curves(kitti, args.plots):
            print(f"wrote {p}")
    return 0


def _score_runtime(rt, cfg, out: Path, coco: bool, progress: bool):
    """Predict the config's val split with the runtime, write the result files to `out` and
    score them; returns (KITTI result, COCO dict or None, number of frames)."""
    import torch
    from torch import nn

    from kd_bnn.data.loader import build_loader
    from kd_bnn.engine.evaluate import predict_to_result_files, val_dataset

    class _RuntimeDetector(nn.Module):
        """The `Detector` calls `predict_to_result_files` makes, answered by the runtime."""

        def __init__(self, runtime):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # device of the inputs: CPU
            self.runtime = runtime
            self.class_names = list(runtime.class_names)

        def forward(self, images):
            return self.runtime(images)

        def predict(self, raw, conf_thres, iou_thres, max_det):
            return self.runtime.predict(raw=raw, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)

    dataset = val_dataset(cfg)
    print(f"evaluating {rt.path} (packed runtime) on {len(dataset)} frames of {dataset.root} "
          f"(split {cfg.data.val_split}) -> {out}")
    loader = build_loader(dataset, cfg.data.batch_size, shuffle=False, workers=cfg.data.workers, seed=cfg.seed)
    classes = list(cfg.data.classes)
    ids = predict_to_result_files(_RuntimeDetector(rt), loader, classes, out, cfg.eval.conf_thres,
                                  cfg.eval.iou_thres, cfg.eval.max_det, progress=progress)
    kitti = evaluate_kitti_dirs(dataset.label_dir, out, ids, strict=True, classes=tuple(classes))
    coco_res = None
    if coco:
        from kd_bnn.eval.coco import evaluate_coco

        gt, dets = load_kitti_dirs(dataset.label_dir, out, ids, strict=True)
        coco_res = evaluate_coco(gt, dets, tuple(classes))
    return kitti, coco_res, len(ids)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = _parser(prog)
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    try:
        model_kv, args.overrides = split_model_override(args.overrides)
    except ValueError as exc:
        ap.error(str(exc))
    model, _ = one_model(ap, {"--model": args.model, "--weights": args.weights, "model=": model_kv})
    if model or args.config:
        if not model:
            ap.error("model mode needs --model CHECKPOINT|MODEL.kdbnn (--config alone names no weights)")
        if args.gt_dir or args.pred_dir:
            ap.error("--gt-dir/--pred-dir (result files) and --model/--config (a model) are exclusive")
        return _model_mode(args, model)
    if not (args.gt_dir and args.pred_dir):
        ap.error("the following arguments are required: --gt-dir, --pred-dir "
                 "(or --model to evaluate a model)")
    if args.overrides:
        ap.error(f"unrecognized arguments: {' '.join(args.overrides)} (key=value overrides need --model)")
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
