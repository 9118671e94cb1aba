"""Evaluation: `evaluate_model`, the one way to score a model, and the report of a config's
checkpoints.

`evaluate_model(model, cfg | loader)`: predictions on a config's validation split (or any loader of
`Batch`es with meta), mapped back through the letterbox to original image pixels and scored
with the official KITTI 2D protocol; flat metrics (``Car/moderate/R40``, ``mAP/moderate/R40``)
and the full `KittiEvalResult`. The trainer's per-epoch evaluation, the ablation table and the
student comparison all call it.

`evaluate_config` is not a second way to score a model but the report of a config's checkpoints
that ``tools/eval.py --config`` prints, on the same predictions (`iter_kitti_predictions`) and
the same loader / device set-up, scored from the result files it writes:
config + checkpoint -> detector (a student rebuilt by `load_student`, a teacher by
`build_model`) -> predictions on the config's validation split, mapped back through the
letterbox -> KITTI result files (one ``%06d.txt`` per frame, 2D fields) -> the official KITTI
2D protocol and COCO mAP *read back from those files* (so the numbers are exactly those of
``tools/eval.py --gt-dir ... --pred-dir ...`` on them) -> the compression summary
(`kd_bnn.binary.summary`). For a student config the teacher is evaluated the same way and
reported side by side, as Xu et al. (ICRA 2019) compare the binary student with its teacher.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.summary import summary as compression_summary
from kd_bnn.config import ExperimentConfig
from kd_bnn.data.dataset import KittiDataset
from kd_bnn.data.kitti import DIFFICULTIES, FrameLabels
from kd_bnn.data.loader import build_datasets, build_loader, unpack_batch
from kd_bnn.data.transforms import eval_transforms, letterbox_to_original
from kd_bnn.engine.build import build_model, ensure_dataset, load_student
from kd_bnn.engine.checkpoint import CheckpointError
from kd_bnn.engine.distributed import resolve_device
from kd_bnn.engine.preflight import check_checkpoint_classes, check_dataset
from kd_bnn.eval.coco import evaluate_coco
from kd_bnn.eval.kitti import (
    KittiEvalResult,
    detections_to_frame,
    evaluate_kitti,
    evaluate_kitti_dirs,
    load_kitti_dirs,
    write_kitti_results,
)
from kd_bnn.eval.report import coco_table, format_report, report_dict
from kd_bnn.models.detector import Detections, Detector

#: thresholds of `evaluate_model` on a loader when none are given (those of ``EvalConfig``)
CONF_THRES, IOU_THRES, MAX_DET = 0.005, 0.45, 300


# --------------------------------------------------------------------------------------------
# Scoring a model
# --------------------------------------------------------------------------------------------
def flatten_kitti_result(result: Any) -> dict[str, float]:
    """``{"Car/moderate/R40": AP, ..., "mAP/moderate/R40": mean}`` from a `KittiEvalResult`."""
    out: dict[str, float] = {}
    kinds: set[str] = set()
    diffs: list[str] = []
    for cls, by_kind in result.ap.items():
        for kind, by_diff in by_kind.items():
            kinds.add(kind)
            for diff, v in by_diff.items():
                out[f"{cls}/{diff}/{kind}"] = float(v)
                if diff not in diffs:
                    diffs.append(diff)
    for kind in sorted(kinds):
        for diff in diffs:
            vals = [out[f"{c}/{diff}/{kind}"] for c in result.ap if f"{c}/{diff}/{kind}" in out]
            if vals:
                out[f"mAP/{diff}/{kind}"] = sum(vals) / len(vals)
    return out


@torch.no_grad()
def iter_kitti_predictions(model: nn.Module, loader: Iterable, class_names: Sequence[str],
                           conf_thres: float = CONF_THRES, iou_thres: float = IOU_THRES, max_det: int = MAX_DET,
                           progress: bool = False) -> Iterator[tuple[str, Any]]:
    """Predict every batch of `loader` and yield ``(image_id, FrameLabels)`` with the boxes mapped
    back from the letterbox to original image pixels (``Batch.meta``) and clipped to the image:
    the detections the KITTI evaluator and the result-file writer consume."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        images, _, _, meta = unpack_batch(batch)
        if len(meta) != images.shape[0]:
            raise ValueError("KITTI evaluation needs Batch.meta (image_id, orig_size, scale, pad) per image")
        preds = model.predict(model(images.to(device)), conf_thres=conf_thres, iou_thres=iou_thres,
                              max_det=max_det)
        for det, m in zip(preds, meta):
            boxes = letterbox_to_original(det.boxes.detach().float().cpu(), m)
            det_orig = Detections(torch.as_tensor(boxes, dtype=torch.float32), det.scores.detach().float().cpu(),
                                  det.labels.detach().cpu())
            yield str(m["image_id"]), detections_to_frame(det_orig, list(class_names), tuple(m["orig_size"]))


def kitti_ground_truth(loader: Iterable) -> dict[str, FrameLabels]:
    """``{image_id: FrameLabels}`` in original pixels of the `KittiDataset` a loader reads
    (``dataset.ids`` / ``dataset.frame_labels(i)``): what `evaluate_model` scores against."""
    ds = getattr(loader, "dataset", None)
    if ds is None or not hasattr(ds, "frame_labels") or not hasattr(ds, "ids"):
        raise ValueError("evaluate_model: pass gt= or a loader over a KittiDataset")
    return {ds.ids[i]: ds.frame_labels(i) for i in range(len(ds))}


def _config_loader(model: nn.Module, cfg: ExperimentConfig, dataset: Any,
                   device: str | torch.device | None) -> tuple[nn.Module, Iterable]:
    """`model` on the config's (or the given) device in eval mode, and the evaluation loader of
    `dataset` with the config's batch size, workers and seed."""
    model = model.to(resolve_device(device if device is not None else cfg.device)).eval()
    return model, build_loader(dataset, cfg.data.batch_size, shuffle=False, workers=cfg.data.workers, seed=cfg.seed)


@torch.no_grad()
def evaluate_model(model: nn.Module, data: ExperimentConfig | Iterable, class_names: Sequence[str] | None = None,
                   *, conf_thres: float | None = None, iou_thres: float | None = None, max_det: int | None = None,
                   gt: dict[str, FrameLabels] | None = None, device: str | torch.device | None = None,
                   progress: bool = False) -> tuple[dict[str, float], KittiEvalResult]:
    """KITTI 2D AP (official devkit protocol) of `model`: the one evaluation entry point.

    Args:
        model: a `Detector` (or anything with ``forward`` and ``predict``).
        data: an `ExperimentConfig`: its validation split, letterboxed to ``data.input_size``
            (``data.root`` must exist), with the thresholds of ``cfg.eval``; `model` is moved to
            ``cfg.device`` and put in eval mode. Or a loader of `Batch`es (or (images, targets,
            ignore, meta) tuples) whose meta has ``image_id``, ``orig_size``, ``scale``, ``pad``:
            `model` is used as it is (the `Trainer` calls it so on its eval model each epoch,
            e.g. through ``functools.partial(evaluate_model, data=val_loader, ...)``).
        class_names: the model's classes in label order (default ``model.class_names``).
        conf_thres, iou_thres, max_det: prediction thresholds; default those of ``cfg.eval``
            (a config) or 0.005, 0.45, 300 (a loader).
        gt: {image_id: FrameLabels} in original pixels; default `kitti_ground_truth` of the
            loader (read anew on each call: pass it to score one loader repeatedly).
        device: move `model` there and put it in eval mode (overrides ``cfg.device``).

    Returns:
        (flat metrics ``{"Car/moderate/R40": AP, ..., "mAP/moderate/R40": mean}``, the
        `KittiEvalResult` with the precision / recall curves).
    """
    if isinstance(data, ExperimentConfig):
        cfg = data
        _, val_ds = build_datasets(cfg.data)
        model, data = _config_loader(model, cfg, val_ds, device)
        conf_thres = cfg.eval.conf_thres if conf_thres is None else conf_thres
        iou_thres = cfg.eval.iou_thres if iou_thres is None else iou_thres
        max_det = cfg.eval.max_det if max_det is None else max_det
    elif device is not None:
        model = model.to(resolve_device(device)).eval()
    names = list(class_names if class_names is not None else model.class_names)
    gt_frames = kitti_ground_truth(data) if gt is None else gt
    dets = dict(iter_kitti_predictions(model, data, names, CONF_THRES if conf_thres is None else conf_thres,
                                       IOU_THRES if iou_thres is None else iou_thres,
                                       MAX_DET if max_det is None else max_det, progress=progress))
    result = evaluate_kitti(gt_frames, dets, names)
    return flatten_kitti_result(result), result


@dataclass
class ModelEvaluation:
    """One evaluated model: its KITTI and COCO results, compression summary and result files."""

    role: str  # "teacher" | "student"
    checkpoint: str
    result_dir: Path
    kitti: KittiEvalResult
    coco: dict | None
    compression: dict[str, Any]  # `kd_bnn.binary.summary` result (rows + totals)
    num_frames: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """``{"bbox_2d", "coco", "compression", "checkpoint", "result_dir", ...}`` (NaN as null)."""
        out = report_dict(self.kitti, self.coco)
        tot = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in self.compression["totals"].items()}
        out.update({"role": self.role, "checkpoint": self.checkpoint, "result_dir": str(self.result_dir),
                    "num_frames": self.num_frames, "seconds": round(self.seconds, 3),
                    "compression": {"input_size": list(self.compression["input_size"]), **tot}})
        return out


@dataclass
class EvaluationReport:
    """The evaluated model (``main``) and, for a student config, its teacher."""

    name: str
    main: ModelEvaluation
    teacher: ModelEvaluation | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The main model's ``{"bbox_2d": ..., "coco": ...}`` (the result-file mode's layout) plus
        its compression and, when evaluated, ``"teacher": {...}`` with the same keys."""
        out: dict[str, Any] = {"name": self.name, **self.main.to_json()}
        if self.teacher is not None:
            out["teacher"] = self.teacher.to_json()
        if self.notes:
            out["notes"] = list(self.notes)
        return out


# --------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------
def _mismatch(path: str | os.PathLike, role: str, exc: Exception) -> ValueError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    more = [ln.strip() for ln in str(exc).splitlines()[1:4] if ln.strip()]
    detail = "; ".join([first] + more)
    return ValueError(f"{role} weights {path} do not fit the model built from the config: {detail}")


def load_teacher(cfg: ExperimentConfig, weights: str | os.PathLike) -> Detector:
    """The teacher (``cfg.teacher`` architecture) with `weights`: a kd_bnn checkpoint or the
    family's own format (Darknet ``.weights``, Ultralytics ``.pt`` with ``teacher.trust``)."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"teacher weights {weights} do not exist")
    check_checkpoint_classes(weights, cfg.data.classes, "teacher")
    mcfg = cfg.teacher.model_copy(update={"weights": str(weights)})
    try:
        return build_model(mcfg, list(cfg.data.classes), tuple(cfg.data.input_size))
    except RuntimeError as exc:  # load_state_dict: missing keys / size mismatch
        raise _mismatch(weights, "teacher", exc) from None


def load_trained_student(cfg: ExperimentConfig, weights: str | os.PathLike) -> Detector:
    """A trained student rebuilt by `load_student` (binarized, stages applied)."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"student checkpoint {weights} does not exist")
    check_checkpoint_classes(weights, cfg.data.classes, "student")
    try:
        return load_student(cfg, weights)
    except RuntimeError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _mismatch(weights, "student", exc) from None


def teacher_weights_of(cfg: ExperimentConfig, teacher_weights: str | os.PathLike | None) -> tuple[str | None, str]:
    """(path, note): the teacher weights to evaluate beside a student, or None and why not.

    Order: `teacher_weights`; when the config trains its teacher first (``teacher_train``), that
    run's ``<output_dir>/<name>/teacher/best.pt``; else ``teacher.weights``.
    """
    if teacher_weights is not None:
        if not Path(teacher_weights).is_file():
            raise FileNotFoundError(f"--teacher-weights {teacher_weights} does not exist")
        return str(teacher_weights), ""
    if cfg.teacher_train is not None:
        trained = Path(cfg.output_dir) / cfg.name / "teacher" / "best.pt"
        if trained.is_file():
            return str(trained), ""
    w = cfg.teacher.weights
    if w is None:
        return None, "teacher not evaluated: teacher.weights is not set (pass --teacher-weights)"
    if not Path(w).is_file():
        return None, f"teacher not evaluated: teacher.weights {w} does not exist (pass --teacher-weights)"
    return str(w), ""


# --------------------------------------------------------------------------------------------
# Data and prediction
# --------------------------------------------------------------------------------------------
def val_dataset(cfg: ExperimentConfig) -> KittiDataset:
    """The config's validation split, letterboxed to ``data.input_size`` (generates the synthetic
    set first when ``data.synthetic`` asks for it; a missing KITTI folder says how to get it).
    Only the val split's images are preflighted: evaluating neither reads nor fails on training
    images."""
    check_dataset(cfg, splits=("val",))
    root = ensure_dataset(cfg.data)
    d = cfg.data
    return KittiDataset(root, d.val_split, classes=d.classes, merge=d.merge, max_images=d.max_images,
                        transforms=eval_transforms(d.input_size))


@torch.no_grad()
def predict_to_result_files(model: nn.Module, loader: Iterable, class_names: Sequence[str], out_dir: str | os.PathLike,
                            conf_thres: float = CONF_THRES, iou_thres: float = IOU_THRES, max_det: int = MAX_DET,
                            progress: bool = False) -> list[str]:
    """Predict every batch, map boxes back to the original image (``Batch.meta``), clip, and
    write one KITTI result file per frame into `out_dir`; returns the frame ids written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    ids: list[str] = []
    names = list(class_names)
    for image_id, frame in iter_kitti_predictions(model, loader, names, conf_thres, iou_thres, max_det,
                                                  progress=progress):
        labels = [names.index(t) for t in frame.types]
        write_kitti_results(out_dir, image_id, frame.boxes, frame.scores, labels, names)
        ids.append(image_id)
    return ids


def evaluate_detector(model: Detector, cfg: ExperimentConfig, dataset: KittiDataset, out_dir: str | os.PathLike,
                      role: str = "model", checkpoint: str = "", coco: bool = True,
                      device: str | torch.device | None = None, progress: bool = False) -> ModelEvaluation:
    """Predict `dataset`, write result files to `out_dir`, score them (KITTI, COCO) and summarise
    the model's size; the scores are read back from the written files."""
    t0 = time.perf_counter()
    size = compression_summary(model, tuple(cfg.data.input_size), print_fn=None)
    model, loader = _config_loader(model, cfg, dataset, device)
    ids = predict_to_result_files(model, loader, list(cfg.data.classes), out_dir, cfg.eval.conf_thres,
                                  cfg.eval.iou_thres, cfg.eval.max_det, progress=progress)
    classes = tuple(cfg.data.classes)
    kitti = evaluate_kitti_dirs(dataset.label_dir, out_dir, ids, strict=True, classes=classes)
    coco_res = None
    if coco:
        gt, dets = load_kitti_dirs(dataset.label_dir, out_dir, ids, strict=True)
        coco_res = evaluate_coco(gt, dets, classes)
    return ModelEvaluation(role, str(checkpoint), Path(out_dir), kitti, coco_res, size, len(ids),
                           time.perf_counter() - t0)


def evaluate_config(cfg: ExperimentConfig, weights: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                    teacher_weights: str | os.PathLike | None = None, with_teacher: bool = True,
                    coco: bool = True, device: str | None = None, progress: bool = False,
                    log=print) -> EvaluationReport:
    """Evaluate the checkpoint of a config's model on its validation split.

    A config with a ``student`` section evaluates the student (`weights`, rebuilt by
    `load_student`) and, when `with_teacher` and teacher weights are known (see
    `teacher_weights_of`), the teacher beside it; a teacher-only config
    evaluates the teacher architecture with `weights`. Result files go to `out_dir` (default
    ``<output_dir>/<name>/eval``), the teacher's to ``<out_dir>/teacher``.

    Raises:
        FileNotFoundError: missing dataset (with how to get KITTI), checkpoint or weights.
        ValueError: class mismatch, or weights that do not fit the configured model.
        CheckpointError: an unreadable checkpoint.
    """
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / cfg.name / "eval"
    if not Path(weights).is_file():
        raise FileNotFoundError(f"checkpoint {weights} does not exist")
    is_student = cfg.student is not None
    t_weights, note = (teacher_weights_of(cfg, teacher_weights) if is_student and with_teacher
                       else (None, ""))
    dataset = val_dataset(cfg)  # data problems first: before building large models
    notes = [note] if note else []
    model = load_trained_student(cfg, weights) if is_student else load_teacher(cfg, weights)
    role = "student" if is_student else "teacher"
    log(f"evaluating {role} {weights} on {len(dataset)} frames of {dataset.root} "
        f"(split {cfg.data.val_split}) -> {out}")
    main = evaluate_detector(model, cfg, dataset, out, role, str(weights), coco, device, progress)
    del model
    teacher = None
    if t_weights is not None:
        tmodel = load_teacher(cfg, t_weights)
        log(f"evaluating teacher {t_weights} -> {out / 'teacher'}")
        teacher = evaluate_detector(tmodel, cfg, dataset, out / "teacher", "teacher", t_weights, coco,
                                    device, progress)
    return EvaluationReport(cfg.name, main, teacher, notes)


# --------------------------------------------------------------------------------------------
# Text reports
# --------------------------------------------------------------------------------------------
def _num(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return fmt.format(v)


def compression_lines(ev: ModelEvaluation) -> str:
    """The compression summary of one model (totals of `kd_bnn.binary.summary`)."""
    t = ev.compression["totals"]
    h, w = ev.compression["input_size"]
    return "\n".join([
        f"Compression (kd_bnn.binary.summary, input {h}x{w})",
        f"  params:      {t['params']:,} ({t['params_1bit']:,} 1-bit, {t['params_32bit']:,} 32-bit)",
        f"  float32:     {t['float32_mb']:.2f} MB",
        f"  packed:      {t['packed_mb']:.2f} MB ({t['num_binary_layers']} binary layers)",
        f"  compression: {t['compression']:.1f}x",
        f"  MACs:        {t['macs']:,} ({100 * t['binary_mac_fraction']:.1f}% binary, {t['macs_xnor']:,} xnor)",
    ])


def side_by_side(models: Sequence[ModelEvaluation]) -> str:
    """Models side by side: one row each for size, compression and COCO AP, then KITTI AP_R40
    and AP_R11 per class and difficulty with a column per model."""
    names = [m.role for m in models]
    name_w = max(8, *(len(n) for n in names)) + 2
    head = (f"{'model':<{name_w}}{'params':>10}{'fp32 MB':>10}{'packed MB':>11}{'ratio':>8}{'binary MACs':>13}"
            f"{'COCO mAP':>10}{'AP50':>8}")
    lines = [" vs ".join(names) + " (AP in percent; KITTI: official devkit protocol)", head, "-" * len(head)]
    for m in models:
        t = m.compression["totals"]
        coco = m.coco or {}
        lines.append(f"{m.role:<{name_w}}{t['params'] / 1e6:>9.2f}M{t['float32_mb']:>10.2f}{t['packed_mb']:>11.2f}"
                     f"{_num(t['compression'], '{:.1f}x'):>8}{100 * t['binary_mac_fraction']:>12.1f}%"
                     f"{_num(coco.get('mAP')):>10}{_num(coco.get('AP50')):>8}")
    cols = [f"{n} {k}" for k in ("R40", "R11") for n in names]
    width = max(12, *(len(c) + 2 for c in cols))
    label_w = max(len(f"{c} {d}") for c in models[0].kitti.ap for d in DIFFICULTIES) + 2
    head = f"{'KITTI AP':<{label_w}}" + "".join(f"{c:>{width}}" for c in cols)
    lines += ["", head, "-" * len(head)]
    for c in models[0].kitti.ap:
        for d in DIFFICULTIES:
            vals = [_num(m.kitti.ap.get(c, {}).get(k, {}).get(d)) for k in ("R40", "R11") for m in models]
            lines.append(f"{c + ' ' + d:<{label_w}}" + "".join(f"{v:>{width}}" for v in vals))
    return "\n".join(lines)


def format_evaluation(report: EvaluationReport, layers: bool = False) -> str:
    """Per model: the KITTI + COCO tables and the compression summary; then the side-by-side
    table when a teacher was evaluated. `layers` adds the per-layer compression table."""
    from kd_bnn.binary.summary import format_summary

    parts = []
    for ev in (m for m in (report.main, report.teacher) if m is not None):
        parts.append(f"== {ev.role}: {ev.checkpoint} ({ev.num_frames} frames, {ev.seconds:.1f} s; "
                     f"result files in {ev.result_dir})\n" + format_report(ev.kitti, None))
        if ev.coco is not None:
            parts.append(coco_table(ev.coco))
        if layers:
            parts.append(format_summary(ev.compression, title=ev.role))
        parts.append(compression_lines(ev))
    if report.teacher is not None:
        parts.append("== side by side: " + side_by_side([report.teacher, report.main]))
    parts += [f"note: {n}" for n in report.notes]
    return "\n\n".join(parts)


__all__ = [
    "EvaluationReport", "ModelEvaluation", "compression_lines", "evaluate_config", "evaluate_detector", "evaluate_model",
    "flatten_kitti_result", "format_evaluation", "iter_kitti_predictions", "kitti_ground_truth", "load_teacher",
    "load_trained_student", "predict_to_result_files", "side_by_side", "teacher_weights_of", "val_dataset",
]
