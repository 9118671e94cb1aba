"""From a config to what a run works on: the dataset root (the synthetic set generated on first
use), the teacher of any registered family (its own weights or a kd_bnn checkpoint), the binary
student made from it, and a trained student rebuilt from its checkpoint; and the seeding a run
starts from. Used by the experiment runner, the evaluation, the benchmarks and the export."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_bnn.binary import binarize
from kd_bnn.binary.convert import apply_stages
from kd_bnn.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig
from kd_bnn.engine.checkpoint import eval_state_dict, load_checkpoint, try_load_checkpoint
from kd_bnn.models.classmap import (
    ClassMapError,
    adapt_classes,
    class_options_help,
    dataset_model,
    names_hint_for,
    read_names,
)
from kd_bnn.models.detector import DETECTORS, ClassCountError, Detector, build_detector


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


def build_model(model_cfg: ModelConfig, class_names: list[str], input_size: tuple[int, int],
                load_weights: bool = True, key: str = "teacher") -> Detector:
    """Build a registered detector family from a `ModelConfig`.

    ``weights`` may be the family's own format (Darknet ``.weights``, Ultralytics ``.pt`` with
    ``trust``) or a kd_bnn training checkpoint (``runs/<name>/best.pt``), whose EMA/model weights
    are loaded (weights-only). A binary student checkpoint is loaded by `load_student` instead.

    A model of other classes than `class_names` (a COCO-pretrained teacher) is built with its own
    classes (``names`` file, or those it carries) and then made a detector of `class_names` by
    ``class_map`` (wrapped, predictions mapped) or ``reset_head`` (head transfer), see
    `kd_bnn.models.classmap.adapt_classes`; a kd_bnn checkpoint is loaded after that, into the
    model the config describes. Errors name the config section `key` (``teacher``, ``student.model``).
    """
    weights = model_cfg.weights if load_weights else None
    ckpt = None
    if weights is not None and "model" in (try_load_checkpoint(weights) or {}):
        ckpt, weights = weights, None
    kwargs: dict[str, Any] = dict(input_size=tuple(input_size), trust=model_cfg.trust, **model_cfg.options)
    if model_cfg.cfg is not None:
        kwargs["cfg"] = model_cfg.cfg
    if weights is not None:
        kwargs["weights"] = weights
    own_classes = model_cfg.names is not None or model_cfg.class_map is not None or model_cfg.reset_head
    if not own_classes:
        try:
            model = build_detector(model_cfg.family, class_names=list(class_names), **kwargs)
        except ClassCountError as exc:
            raise ConfigError(class_options_help(key, exc.model_names, exc.model_classes, list(class_names))) from None
    else:
        names = read_names(model_cfg.names, f"{key}.names") if model_cfg.names is not None else None
        if names is not None:
            kwargs["class_names"] = names
        try:
            model = build_detector(model_cfg.family, **kwargs)
        except ClassCountError as exc:
            if names is None:
                raise
            raise ConfigError(f"{key}.names: {model_cfg.names} lists {len(names)} class names but the model "
                              f"predicts {exc.model_classes} classes") from None
        try:
            model = adapt_classes(model, class_names, model_cfg.class_map, model_cfg.reset_head, key,
                                  names_hint_for(model.class_names, model_cfg.names, key))
        except ClassMapError as exc:
            raise ConfigError(str(exc)) from None
    if ckpt is not None:
        model.load_state_dict(eval_state_dict(load_checkpoint(ckpt)))
    return model


def native_binary_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """The ``student.binary`` keys a natively binary family (its factory's ``binary_options``, e.g.
    BinaryDenseNet-YOLO, Bi-Real-YOLO) is built with: those the config sets; the family's own
    defaults for the rest. Setting them again under ``student.model.options`` is an error, so a
    student's binary options have one source (``student.binary``)."""
    scfg = cfg.student
    if scfg is None or scfg.model is None:
        return {}
    takes = getattr(DETECTORS.get(scfg.model.family), "binary_options", ())
    twice = sorted(k for k in takes if k in scfg.model.options)
    if twice:
        raise ConfigError(
            f"student.model.options: {', '.join(twice)} of the {scfg.model.family} student are set in "
            f"student.binary ({', '.join(f'student.binary.{k}' for k in twice)}), not in the model options")
    return {k: getattr(scfg.binary, k) for k in takes if k in scfg.binary.model_fields_set}


def build_student(teacher: Detector, cfg: ExperimentConfig, init_weights: bool = True) -> tuple[Detector, Any]:
    """The binary student: a copy of the teacher initialised from its float weights
    (``student.init_from_teacher``) or a fresh model of ``student.model``, then `binarize`d, then
    loaded from ``student.weights`` when set and `init_weights` (a checkpoint of this student:
    two-stage training's stage 2 started from stage 1 as a separate run).

    The student of a class-mapped teacher (``teacher.class_map`` without ``reset_head``) predicts
    the dataset's classes in its own head: the teacher's model with its prediction layers resized
    (head transfer, each class from its first mapped teacher class; `kd_bnn.models.classmap`)."""
    scfg = cfg.student
    if scfg is None:
        raise ValueError("config has no 'student' section: this run trains the teacher only")
    if scfg.model is not None:
        model_cfg = scfg.model.model_copy(update={"options": {**scfg.model.options, **native_binary_options(cfg)}})
        student = build_model(model_cfg, teacher.class_names, teacher.input_size, load_weights=False,
                              key="student.model")
    elif scfg.init_from_teacher:
        student = dataset_model(teacher)
        if student is teacher:
            student = copy.deepcopy(teacher)
    else:
        student = build_model(cfg.teacher, teacher.class_names, teacher.input_size, load_weights=False)
    student = dataset_model(student)
    if list(student.class_names) != list(teacher.class_names):
        raise ValueError(f"teacher classes {teacher.class_names} and student classes "
                         f"{student.class_names} differ: they must predict the same classes")
    student, report = binarize(student, scfg.binary)
    if scfg.weights is not None and init_weights:
        _load_student_weights(student, scfg.weights)
    return student, report


def _load_student_weights(student: Detector, path: str) -> None:
    """``student.weights``: a kd_bnn checkpoint of this same student (weights only, no pickle)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"student.weights {path} does not exist (stage 2 of two-stage training "
                                "starts from stage 1's <run>/stage1/best.pt)")
    try:
        student.load_state_dict(eval_state_dict(load_checkpoint(path)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:3]
        raise ValueError(f"student.weights {path}: not a checkpoint of this student ({' '.join(first)[:400]})") from None


def load_student(cfg: ExperimentConfig, checkpoint: str | os.PathLike) -> Detector:
    """Rebuild a trained student from its config and checkpoint (weights-only), stages applied."""
    teacher = build_model(cfg.teacher, cfg.data.classes, cfg.data.input_size, load_weights=False)
    student, _ = build_student(teacher, cfg, init_weights=False)  # its own weights follow
    student.load_state_dict(eval_state_dict(load_checkpoint(checkpoint)))
    if cfg.student is not None:
        apply_stages(student, cfg.student.binary, 10**9)
    return student


__all__ = ["build_model", "build_student", "ensure_dataset", "load_student", "seed_everything"]
