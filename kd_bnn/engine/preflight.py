"""Checks run before an experiment or an evaluation starts, so that bad input fails at once with
a message the user can act on rather than minutes later (or deep in a traceback)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kd_bnn.config import ExperimentConfig
from kd_bnn.data.dataset import how_to_get_kitti
from kd_bnn.engine.checkpoint import CheckpointError, load_checkpoint

_KDBNN_SUFFIXES = (".pt", ".pth", ".ckpt")


def checkpoint_classes(path: str | os.PathLike) -> list[str] | None:
    """Class names stored in a kd_bnn training checkpoint (None for other formats / no record)."""
    p = Path(path)
    if p.suffix not in _KDBNN_SUFFIXES or not p.is_file():
        return None
    try:
        state = load_checkpoint(p)
    except CheckpointError:
        return None  # e.g. a pickled Ultralytics .pt: the family's loader checks it
    names = state.get("class_names")
    return [str(c) for c in names] if isinstance(names, (list, tuple)) and names else None


def check_checkpoint_classes(path: str | os.PathLike, classes: Sequence[str], role: str) -> None:
    """Raise ValueError when a kd_bnn checkpoint was trained for other classes than `classes`
    (teacher and student must predict the same classes, in the same order)."""
    stored = checkpoint_classes(path)
    if stored is not None and list(stored) != list(classes):
        raise ValueError(f"{role} checkpoint {path} was trained for classes {stored}, but the config's "
                         f"data.classes are {list(classes)}: teacher and student must predict the same "
                         "classes in the same order (fix data.classes or use a matching checkpoint)")


def check_dataset(cfg: ExperimentConfig) -> None:
    """Raise FileNotFoundError (saying how to get KITTI or make the synthetic set) when
    ``data.root`` holds no KITTI training folder and the config does not generate one."""
    if cfg.data.synthetic is not None:
        return  # generated on first use (kd_bnn.engine.experiment.ensure_dataset)
    root = Path(cfg.data.root)
    for cand in (root / "training", root):
        if (cand / "image_2").is_dir() and (cand / "label_2").is_dir():
            return
    missing = [str(root / "training" / d) for d in ("image_2", "label_2") if not (root / "training" / d).is_dir()]
    lead = f"{root}: missing {', '.join(missing)}\n" if root.is_dir() else ""
    raise FileNotFoundError(lead + how_to_get_kitti(root))


def check_experiment(cfg: ExperimentConfig) -> None:
    """What `run_experiment` needs before it starts: the dataset, and for a student run whose
    teacher is not trained first, existing teacher weights predicting ``data.classes``."""
    check_dataset(cfg)
    w = cfg.teacher.weights
    if w is not None:
        if not Path(w).is_file():
            hint = ("train the teacher first (its run writes runs/<name>/best.pt) or point "
                    "teacher.weights=PATH at a trained teacher")
            raise FileNotFoundError(f"teacher.weights {w} does not exist: {hint}")
        check_checkpoint_classes(w, cfg.data.classes, "teacher")


__all__ = ["check_checkpoint_classes", "check_dataset", "check_experiment", "checkpoint_classes"]
