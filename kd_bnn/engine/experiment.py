"""Whole experiments from a config: data -> teacher -> binary student -> distillation -> report.

This is what ``tools/train.py`` and ``make demo`` run; every step is also callable on its own
(`build_model`, `build_student`, `train_model`, `evaluate_model`) so that a notebook can do what
the CLI does. The flow follows Xu et al. (ICRA 2019): a full-precision teacher, a binary-weight
copy of it initialised from its float weights, trained with the detection loss plus feature
mimic terms (`cfg.distill.terms`).
"""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_bnn.binary import binarize
from kd_bnn.binary.convert import apply_stages
from kd_bnn.binary.summary import summary as compression_summary
from kd_bnn.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, config_to_dict
from kd_bnn.data.loader import build_datasets, build_loader
from kd_bnn.distill import Distiller
from kd_bnn.engine.checkpoint import eval_state_dict, load_checkpoint
from kd_bnn.engine.trainer import Trainer, make_kitti_evaluate_fn, resolve_device
from kd_bnn.io import atomic_write_text
from kd_bnn.models.detector import Detector, build_detector

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ensure_dataset(data_cfg: DataConfig) -> Path:
    """The dataset root; generates the synthetic KITTI set there first when the config asks for it
    (``data.synthetic``) and the folder does not hold one yet; a set made with other parameters
    is an error (`kd_bnn.data.synthetic.check_synthetic`), never silently reused or replaced."""
    root = Path(data_cfg.root)
    s = data_cfg.synthetic
    if s is None:
        return root
    from kd_bnn.data.synthetic import check_synthetic, generate

    if not (root / "training" / "label_2").is_dir():
        print(f"generating synthetic KITTI: {s.num} frames of {s.size[0]}x{s.size[1]} into {root} (seed {s.seed})")
        generate(root, s.num, s.seed, size=tuple(s.size), val_fraction=s.val_fraction)
    else:
        check_synthetic(root, s.num, s.seed, size=tuple(s.size), val_fraction=s.val_fraction)
    return root


def _is_kdbnn_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.suffix not in _CHECKPOINT_SUFFIXES or not p.is_file():
        return False
    try:
        state = load_checkpoint(p)
    except Exception:
        return False  # e.g. an Ultralytics .pt (pickled code): left to the family's loader
    return "model" in state


def build_model(model_cfg: ModelConfig, class_names: list[str], input_size: tuple[int, int],
                load_weights: bool = True) -> Detector:
    """Build a registered detector family from a `ModelConfig`.

    ``weights`` may be the family's own format (Darknet ``.weights``, Ultralytics ``.pt`` with
    ``trust``) or a kd_bnn training checkpoint (``runs/<name>/best.pt``), whose EMA/model weights
    are loaded (weights-only). A binary student checkpoint is loaded by `load_student` instead.
    """
    weights = model_cfg.weights if load_weights else None
    ckpt = None
    if weights is not None and _is_kdbnn_checkpoint(weights):
        ckpt, weights = weights, None
    kwargs: dict[str, Any] = dict(class_names=list(class_names), input_size=tuple(input_size),
                                  trust=model_cfg.trust, **model_cfg.options)
    if model_cfg.cfg is not None:
        kwargs["cfg"] = model_cfg.cfg
    if weights is not None:
        kwargs["weights"] = weights
    model = build_detector(model_cfg.family, **kwargs)
    if ckpt is not None:
        model.load_state_dict(eval_state_dict(load_checkpoint(ckpt)))
    return model


def build_student(teacher: Detector, cfg: ExperimentConfig) -> tuple[Detector, Any]:
    """The binary student: a copy of the teacher initialised from its float weights
    (``student.init_from_teacher``) or a fresh model of ``student.model``, then `binarize`d."""
    scfg = cfg.student
    if scfg is None:
        raise ValueError("config has no 'student' section: this run trains the teacher only")
    if scfg.model is not None:
        student = build_model(scfg.model, teacher.class_names, teacher.input_size, load_weights=False)
    elif scfg.init_from_teacher:
        student = copy.deepcopy(teacher)
    else:
        student = build_model(cfg.teacher, teacher.class_names, teacher.input_size, load_weights=False)
    if list(student.class_names) != list(teacher.class_names):
        raise ValueError(f"teacher classes {teacher.class_names} and student classes "
                         f"{student.class_names} differ: they must predict the same classes")
    student, report = binarize(student, scfg.binary)
    return student, report


def load_student(cfg: ExperimentConfig, checkpoint: str | os.PathLike) -> Detector:
    """Rebuild a trained student from its config and checkpoint (weights-only), stages applied."""
    teacher = build_model(cfg.teacher, cfg.data.classes, cfg.data.input_size, load_weights=False)
    student, _ = build_student(teacher, cfg)
    student.load_state_dict(eval_state_dict(load_checkpoint(checkpoint)))
    if cfg.student is not None:
        apply_stages(student, cfg.student.binary, 10**9)
    return student


@dataclass
class RunResult:
    """What one training run produced."""

    run_dir: Path
    best_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "completed"
    best_epoch: int | None = None  # the epoch ``best_checkpoint`` holds, when it was evaluated
    epochs: int = 0

    def best_is_last_evaluation(self) -> bool:
        """True when ``metrics`` (the last evaluation) are those of ``best_checkpoint``."""
        return bool(self.metrics) and self.status == "completed" and self.best_epoch == self.epochs


def train_model(model: Detector, cfg: ExperimentConfig, train_cfg: TrainConfig, run_dir: Path,
                teacher: Detector | None = None, resume: str | os.PathLike | None = None,
                progress: bool | None = None, loaders=None) -> RunResult:
    """Train `model` (distilling from `teacher` when given and ``distill`` is enabled)."""
    train_ds, val_ds = build_datasets(cfg.data) if loaders is None else (None, None)
    if loaders is None:
        train_loader = build_loader(train_ds, cfg.data.batch_size, shuffle=True, workers=cfg.data.workers,
                                    seed=cfg.seed)
        val_loader = build_loader(val_ds, cfg.data.batch_size, shuffle=False, workers=cfg.data.workers,
                                  seed=cfg.seed)
    else:
        train_loader, val_loader = loaders
    distiller = None
    if teacher is not None and cfg.distill.enabled and cfg.distill.terms:
        distiller = Distiller(teacher, model, cfg.distill.terms)
    evaluate_fn = make_kitti_evaluate_fn(val_loader, list(model.class_names), cfg.eval.conf_thres,
                                         cfg.eval.iou_thres, cfg.eval.max_det)
    trainer = Trainer(model, train_loader, val_loader, train_cfg, run_dir, distiller=distiller,
                      binary_policy=cfg.student.binary if (teacher is not None and cfg.student) else None,
                      evaluate_fn=evaluate_fn, device=cfg.device, config_dict=config_to_dict(cfg),
                      seed=cfg.seed, progress=progress, resume=resume)
    out = trainer.fit()
    best = Path(run_dir) / "best.pt"
    if not best.is_file():
        best = Path(run_dir) / "last.pt"
    if distiller is not None:
        distiller.remove_taps()
    trainer.close()
    return RunResult(Path(run_dir), best if best.is_file() else None, dict(out.get("metrics") or {}),
                     out.get("status", "completed"), out.get("best_epoch"), int(train_cfg.epochs))


@torch.no_grad()
def evaluate_model(model: Detector, cfg: ExperimentConfig) -> tuple[dict[str, float], Any]:
    """KITTI metrics (flat keys like ``Car/moderate/R40``) of `model` on the config's val split."""
    _, val_ds = build_datasets(cfg.data)
    loader = build_loader(val_ds, cfg.data.batch_size, shuffle=False, workers=cfg.data.workers, seed=cfg.seed)
    fn = make_kitti_evaluate_fn(loader, list(model.class_names), cfg.eval.conf_thres, cfg.eval.iou_thres,
                                cfg.eval.max_det)
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    return fn(model)


def model_size(model: nn.Module, input_size: tuple[int, int]) -> dict[str, float]:
    """Parameters, float32 MB, packed MB and compression (the `.kdbnn` accounting)."""
    s = compression_summary(model, tuple(input_size), print_fn=lambda *_: None)
    t = s["totals"]
    return {"params": float(sum(p.numel() for p in model.parameters())),
            "float32_mb": t["float32_bytes"] / 2**20, "packed_mb": t["packed_bytes"] / 2**20,
            "compression": t["compression"], "binary_mac_fraction": t.get("binary_mac_fraction", 0.0)}


def run_experiment(cfg: ExperimentConfig, resume: str | os.PathLike | None = None,
                   progress: bool | None = None) -> dict[str, Any]:
    """Run a whole config: optionally train the teacher, then train the binary student.

    Layout: ``<output_dir>/<name>/`` for the trained model (``teacher/`` beneath it when the
    teacher is trained first). Returns a JSON-able summary, also written to ``results.json``.
    """
    seed_everything(cfg.seed)
    ensure_dataset(cfg.data)
    run_dir = Path(cfg.output_dir) / cfg.name
    classes, size = list(cfg.data.classes), tuple(cfg.data.input_size)
    teacher = build_model(cfg.teacher, classes, size)
    results: dict[str, Any] = {"name": cfg.name, "run_dir": str(run_dir)}

    if cfg.student is None:  # teacher-only run
        res = train_model(teacher, cfg, cfg.train, run_dir, resume=resume, progress=progress)
        results["teacher"] = {"checkpoint": str(res.best_checkpoint), "metrics": res.metrics,
                              **model_size(teacher, size)}
    else:
        if cfg.teacher_train is not None:
            tdir = run_dir / "teacher"
            tres = train_model(teacher, cfg, cfg.teacher_train, tdir, progress=progress,
                               resume=tdir / "last.pt" if resume and (tdir / "last.pt").is_file() else None)
            if tres.best_checkpoint is not None:
                teacher.load_state_dict(eval_state_dict(load_checkpoint(tres.best_checkpoint)))
            results["teacher"] = {"checkpoint": str(tres.best_checkpoint), "metrics": tres.metrics}
        teacher.eval()
        student, report = build_student(teacher, cfg)
        (run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "binarize_report.txt", report.table())
        sres = train_model(student, cfg, cfg.train, run_dir, teacher=teacher, resume=resume, progress=progress)
        reusable = False
        if sres.best_checkpoint is not None:
            student.load_state_dict(eval_state_dict(load_checkpoint(sres.best_checkpoint)))
            reusable = _metrics_of_final_student(sres, student, cfg)
        results["student"] = {"checkpoint": str(sres.best_checkpoint), "metrics": sres.metrics,
                               "metrics_of_checkpoint": reusable,
                               "distilled": bool(cfg.distill.enabled and cfg.distill.terms),
                               **model_size(student, size)}
        results.setdefault("teacher", {}).update(model_size(teacher, size))
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2, default=str))
    return results


ABLATION_CLASSES = ("Car", "Pedestrian", "Cyclist")


def _metrics_of_final_student(res: RunResult, student: Detector, cfg: ExperimentConfig) -> bool:
    """Whether ``res.metrics`` evaluate the state now loaded in `student` with every binary layer
    on: the best checkpoint is the last evaluated epoch and no binarization stage starts after
    it. Leaves every stage enabled (the deployed student)."""
    at_last = len(apply_stages(student, cfg.student.binary, cfg.train.epochs - 1))
    return res.best_is_last_evaluation() and at_last == len(apply_stages(student, cfg.student.binary, 10**9))


def run_ablation(cfg: ExperimentConfig, progress: bool | None = None) -> list[dict[str, Any]]:
    """The paper's ablation on one config: teacher, binary student without and with knowledge
    transfer, each evaluated on the validation split (Xu et al., ICRA 2019, Table I style).

    The teacher is trained first when ``teacher_train`` is set (into ``<name>/teacher``); both
    students start from the same teacher weights and train with the same budget (``train``), so
    the only difference between them is the distillation terms.
    """
    if cfg.student is None:
        raise ValueError("run_ablation needs a 'student' section in the config")
    seed_everything(cfg.seed)
    ensure_dataset(cfg.data)
    base = Path(cfg.output_dir) / cfg.name
    classes, size = list(cfg.data.classes), tuple(cfg.data.input_size)
    teacher = build_model(cfg.teacher, classes, size)
    tres = None
    if cfg.teacher_train is not None:
        tdir = base / "teacher"
        tres = train_model(teacher, cfg, cfg.teacher_train, tdir, progress=progress)
        teacher.load_state_dict(eval_state_dict(load_checkpoint(tres.best_checkpoint)))
    teacher.eval()
    reuse = tres.metrics if tres is not None and tres.best_is_last_evaluation() else None
    rows = [_ablation_row("teacher (float32)", teacher, cfg, reuse)]
    for label, kd in (("student BWN, no KD", False), ("student BWN + KD", True)):
        scfg = cfg.model_copy(deep=True)
        scfg.distill.enabled = kd and bool(cfg.distill.terms)
        seed_everything(cfg.seed)
        student, _ = build_student(teacher, scfg)
        res = train_model(student, scfg, scfg.train, base / ("student_kd" if kd else "student_nokd"),
                          teacher=teacher, progress=progress)
        student.load_state_dict(eval_state_dict(load_checkpoint(res.best_checkpoint)))
        rows.append(_ablation_row(label, student, scfg,
                                  res.metrics if _metrics_of_final_student(res, student, scfg) else None))
    atomic_write_text(base / "ablation.json", json.dumps(rows, indent=2, default=str))
    atomic_write_text(base / "ablation.txt", format_ablation(rows))
    return rows


def _ablation_row(label: str, model: Detector, cfg: ExperimentConfig,
                  metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """A table row; `metrics` are the trainer's final evaluation of this very state when it has
    one (same val split and thresholds), else the model is evaluated here."""
    if metrics is None:
        metrics, _ = evaluate_model(model, cfg)
    row: dict[str, Any] = {"model": label, **model_size(model, tuple(cfg.data.input_size))}
    row["ap_r40"] = {c: {d: metrics.get(f"{c}/{d}/R40", float("nan")) for d in ("easy", "moderate", "hard")}
                     for c in cfg.data.classes}
    return row


def format_ablation(rows: list[dict[str, Any]]) -> str:
    """One text table: model, params, float32 MB, packed MB, compression, AP_R40 E/M/H per class."""
    classes = list(rows[0]["ap_r40"]) if rows else []
    head = f"{'model':<22}{'params':>9}{'fp32 MB':>9}{'packed MB':>10}{'ratio':>7}"
    for c in classes:
        head += f"  {c + ' AP_R40 E/M/H':>26}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['model']:<22}{r['params'] / 1e6:>8.2f}M{r['float32_mb']:>9.2f}{r['packed_mb']:>10.3f}"
                f"{r['compression']:>6.1f}x")
        for c in classes:
            ap = r["ap_r40"][c]
            line += f"  {ap['easy']:>8.2f}/{ap['moderate']:>6.2f}/{ap['hard']:>6.2f}    "
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"
