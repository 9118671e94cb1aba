"""Checks run before an experiment or an evaluation starts, so that bad input fails at once with
a message the user can act on rather than minutes later (or deep in a traceback)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kd_bnn.config import ExperimentConfig
from kd_bnn.data.dataset import check_images, how_to_get_kitti, split_frames
from kd_bnn.engine.checkpoint import try_load_checkpoint


def checkpoint_classes(path: str | os.PathLike) -> list[str] | None:
    """Class names stored in a kd_bnn training checkpoint (None for other formats / no record)."""
    names = (try_load_checkpoint(path) or {}).get("class_names")
    return [str(c) for c in names] if isinstance(names, (list, tuple)) and names else None


def check_checkpoint_classes(path: str | os.PathLike, classes: Sequence[str], role: str) -> None:
    """Raise ValueError when a kd_bnn checkpoint was trained for other classes than `classes`
    (teacher and student must predict the same classes, in the same order)."""
    stored = checkpoint_classes(path)
    if stored is not None and list(stored) != list(classes):
        raise ValueError(f"{role} checkpoint {path} was trained for classes {stored}, but the config's "
                         f"data.classes are {list(classes)}: teacher and student must predict the same "
                         "classes in the same order (fix data.classes or use a matching checkpoint)")


def _has_layout(root: Path) -> bool:
    return any((c / "image_2").is_dir() and (c / "label_2").is_dir() for c in (root / "training", root))


def check_dataset(cfg: ExperimentConfig, images: bool = True, splits: Sequence[str] = ("train", "val")) -> int:
    """Check ``data.root`` before anything runs; returns the number of images checked.

    * no KITTI training folder (and the config does not generate one): FileNotFoundError saying
      how to get KITTI or make the synthetic set;
    * with `images`, every frame of the `splits` (``data.train_split`` / ``data.val_split``,
      capped by ``data.max_images``) must have an image and a label file, and every image must
      pass `kd_bnn.data.dataset.check_image`: the file exists, its header decodes, its size is
      plausible and it is not cut short (no pixels are decoded: about 0.1 ms an image). A bad
      image is a `KittiDatasetError` (a ValueError) listing each bad file and its problem, so it
      cannot crash an epoch later. A synthetic set not generated yet is not checked.
    """
    root = Path(cfg.data.root)
    if cfg.data.synthetic is not None and not (root / "training" / "label_2").is_dir():
        return 0  # generated on first use (kd_bnn.engine.experiment.ensure_dataset)
    if not _has_layout(root):
        missing = [str(root / "training" / d) for d in ("image_2", "label_2")
                   if not (root / "training" / d).is_dir()]
        lead = f"{root}: missing {', '.join(missing)}\n" if root.is_dir() else ""
        raise FileNotFoundError(lead + how_to_get_kitti(root))
    if not images:
        return 0
    paths: dict[Path, None] = {}
    names = []
    by_name = {"train": cfg.data.train_split, "val": cfg.data.val_split}
    for which in splits:
        if which not in by_name:
            raise ValueError(f"check_dataset: splits must be 'train' and/or 'val', found {which!r}")
        split = by_name[which]
        _, image_paths, _ = split_frames(root, split, cfg.data.max_images)
        paths.update(dict.fromkeys(image_paths))
        names.append(f"{which} split {split!r}")
    return check_images(list(paths), what=f"images of the {' and '.join(names)} in {root}")


def check_experiment(cfg: ExperimentConfig) -> None:
    """What `run_experiment` needs before it starts: the dataset, and for a student run whose
    teacher is not trained first, existing teacher weights predicting ``data.classes``; then the
    images of the train and val splits (the slowest check last)."""
    check_dataset(cfg, images=False)
    if cfg.student is not None:  # binary policy names against the registries, and one source for them
        from kd_bnn.binary.convert import as_policy
        from kd_bnn.engine.build import native_binary_options

        as_policy(cfg.student.binary)
        native_binary_options(cfg)
        sw = cfg.student.weights
        if sw is not None and not Path(sw).is_file():
            raise FileNotFoundError(
                f"student.weights {sw} does not exist: the student starts from a checkpoint of its own "
                "(two-stage training's stage 2 from stage 1's <run>/stage1/best.pt); run stage 1 first, "
                "or set stage1_train to run both stages in one run")
    w = cfg.teacher.weights
    if w is not None:
        if not Path(w).is_file():
            hint = ("train the teacher first (its run writes runs/<name>/best.pt) or point "
                    "teacher.weights=PATH at a trained teacher")
            raise FileNotFoundError(f"teacher.weights {w} does not exist: {hint}")
        check_checkpoint_classes(w, cfg.data.classes, "teacher")
    check_dataset(cfg)


__all__ = ["check_checkpoint_classes", "check_dataset", "check_experiment", "checkpoint_classes"]
