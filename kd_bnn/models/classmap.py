"""A model trained on other classes (a COCO-pretrained detector) used on the dataset's classes.

Two ways, chosen by the model config (``teacher.class_map``, ``teacher.reset_head``; see the
README, "Bring your own COCO model"):

* **class map** (``class_map`` alone): :class:`ClassMappedDetector` wraps the model as it is (its
  80-class head untouched) and speaks the dataset's classes: its predictions are the model's,
  each label mapped through the map (detections of unmapped classes dropped); its
  ``distill_outputs`` carry class logits per dataset class, so output-level distillation sees the
  classes the student predicts. For a teacher used for evaluation and distillation.
* **head transfer** (``reset_head: true``): `Detector.with_classes` resizes the prediction layers
  to the dataset's classes, each new class row initialised from its mapped class (Car from car),
  box and objectness rows kept. The result is a plain model of its family (trainable, exportable).
  The student of a class-mapped teacher is made so too (:func:`dataset_model`).

The model's own class names come from a names file (``names``: one class per line, as Darknet's
``coco.names``) or from the model where it carries them (an Ultralytics ``.pt``). A names file is
data: plain text, nothing in it is run or loaded.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import batched_nms

from kd_bnn.models.detector import Detections, Detector

#: class logit given to a dataset class no model class maps to (sigmoid ~1e-13): in
#: `ClassMappedDetector.distill_outputs` the teacher never predicts it.
ABSENT_LOGIT = -30.0

#: detections the wrapped model may return per image before the class map drops and merges them
_INNER_MAX_DET = 30000

_MAX_NAMES_BYTES = 1 << 20


class ClassMapError(ValueError):
    """A names file or class map that does not fit the model or the dataset (the message names
    the config key, the class and the valid ones)."""


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def read_names(path: str | os.PathLike, key: str = "teacher.names") -> list[str]:
    """Class names from a names file: one class per line, in label order (Darknet ``.names``);
    surrounding whitespace is stripped and blank lines skipped. Empty files and repeated names
    are errors naming the file (and the line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: names file {p} does not exist (one class per line, e.g. coco.names)")
    if p.stat().st_size > _MAX_NAMES_BYTES:
        raise ClassMapError(f"{key}: {p} is {p.stat().st_size} bytes; a names file holds one class name a line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ClassMapError(f"{key}: {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in first_line:
            raise ClassMapError(f"{key}: {p}:{lineno}: class {name!r} is listed twice (first at line "
                                f"{first_line[name]}); a class map needs unique names")
        first_line[name] = lineno
        names.append(name)
    if not names:
        raise ClassMapError(f"{key}: {p} lists no class names (one class per line, e.g. coco.names)")
    return names


@dataclass(frozen=True)
class ClassMap:
    """Which model classes feed which dataset class.

    Attributes:
        source_names: the model's classes, in its label order.
        target_names: the dataset's classes (``data.classes``), in label order.
        sources: per dataset class, the model classes mapped to it, in the order the map lists
            them (empty: none); the first one initialises that class in a head transfer.
    """

    source_names: tuple[str, ...]
    target_names: tuple[str, ...]
    sources: tuple[tuple[int, ...], ...]

    @property
    def target_of(self) -> list[int]:
        """Per model class, its dataset class index, or -1 (ignored)."""
        out = [-1] * len(self.source_names)
        for j, srcs in enumerate(self.sources):
            for s in srcs:
                out[s] = j
        return out

    @property
    def first_sources(self) -> list[int | None]:
        """Per dataset class, the model class it starts from in a head transfer (None: fresh)."""
        return [srcs[0] if srcs else None for srcs in self.sources]

    @property
    def is_identity(self) -> bool:
        return self.source_names == self.target_names and all(
            srcs == (j,) for j, srcs in enumerate(self.sources))

    def as_dict(self) -> dict[str, str]:
        """``{model class: dataset class}`` of the mapped classes (the config's form)."""
        return {self.source_names[s]: self.target_names[j] for j, srcs in enumerate(self.sources) for s in srcs}


def resolve_class_map(source_names: Sequence[str], target_names: Sequence[str],
                      class_map: Mapping[str, str] | None, key: str = "teacher",
                      names_hint: str = "") -> ClassMap:
    """Check a ``class_map`` (model class -> dataset class) against both class lists; without one,
    classes map by equal name. Errors name the class and list the valid ones.

    Args:
        names_hint: appended to an unknown-model-class error (e.g. where the model's names come from).
    """
    src, tgt = [str(n) for n in source_names], [str(n) for n in target_names]
    sources: list[list[int]] = [[] for _ in tgt]
    if class_map is None:
        for j, name in enumerate(tgt):
            if name in src:
                sources[j].append(src.index(name))
        return ClassMap(tuple(src), tuple(tgt), tuple(tuple(s) for s in sources))
    if not isinstance(class_map, Mapping) or not class_map:
        raise ClassMapError(f"{key}.class_map: expected a mapping of model classes to data.classes, e.g. "
                            "{car: Car, person: Pedestrian, bicycle: Cyclist}")
    for s_name, t_name in class_map.items():
        s_name, t_name = str(s_name), str(t_name)
        if s_name not in src:
            close = difflib.get_close_matches(s_name, src, n=1) or [n for n in src if n.lower() == s_name.lower()][:1]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ClassMapError(f"{key}.class_map: {s_name!r} is not a class of the model{hint}; its "
                                f"{len(src)} classes: {_listing(src)}{names_hint}")
        if t_name not in tgt:
            raise ClassMapError(f"{key}.class_map: {s_name} -> {t_name!r}: {t_name!r} is not in data.classes "
                                f"({', '.join(tgt)})")
        sources[tgt.index(t_name)].append(src.index(s_name))
    return ClassMap(tuple(src), tuple(tgt), tuple(tuple(s) for s in sources))


def carries_no_names(names: Sequence[str]) -> bool:
    """True for the placeholder names a family gives a model that carries none (class0, class1, ...)."""
    return all(str(n) == f"class{i}" for i, n in enumerate(names))


def class_options_help(key: str, model_names: Sequence[str] | None, model_classes: int,
                       data_classes: Sequence[str]) -> str:
    """The error of a model predicting other classes than ``data.classes`` with neither a class
    map nor a head reset: which of the two to use, and how."""
    named = bool(model_names) and not carries_no_names(model_names or [])
    own = f" ({_listing(list(model_names or []))})" if named else ""
    names_note = "" if named else (
        f" with {key}.names=<names file> (one class per line, e.g. coco.names: the model carries no class names)")
    return (
        f"{key}: the model predicts {model_classes} classes{own} but data.classes has {len(data_classes)} "
        f"({', '.join(data_classes)}). Set one of:\n"
        f"  {key}.class_map (model class -> data class, e.g. '{{car: Car, person: Pedestrian, bicycle: Cyclist}}')"
        f"{names_note} to use the model as it is, its predictions mapped to data.classes: for evaluation and "
        f"distillation;\n"
        f"  {key}.reset_head=true (with {key}.class_map to start each data class from a model class) to resize "
        f"its prediction layers to data.classes and fine-tune it (teacher_train).")


class ClassMappedDetector(Detector):
    """A detector trained on other classes, seen through a class map as a detector of the
    dataset's classes (the `Detector` contract with ``class_names`` = the dataset's).

    * ``forward``: the wrapped model's raw maps, unchanged (all its classes);
    * ``predict``: the wrapped model's detections (every class, class-wise NMS), labels mapped,
      unmapped classes dropped; when several model classes feed one dataset class (car, truck ->
      Car) their detections are merged by one more class-wise NMS (the best score wins). With a
      one-to-one map the detections are exactly the wrapped model's of the mapped classes;
    * ``distill_outputs``: the wrapped model's, class logits per dataset class (the max over its
      model classes; :data:`ABSENT_LOGIT` for a class none maps to);
    * ``loss`` (training a class-mapped teacher, ``teacher_train`` without ``reset_head``): the
      wrapped model's loss with each target relabelled to its dataset class's first model class;
      targets of a dataset class no model class maps to are DontCare (neither positive nor
      negative). Its head keeps all its classes; ``reset_head: true`` trains a head of the
      dataset's classes instead;
    * taps, prediction / fixed convs, activation blocks, objectness: the wrapped model's (module
      paths under ``model.``). Not exported: a ``.kdbnn`` holds a student (its head resized to
      the dataset's classes) or a ``reset_head`` teacher.
    """

    def __init__(self, model: Detector, class_map: ClassMap):
        super().__init__()
        if list(class_map.source_names) != [str(n) for n in model.class_names]:
            raise ValueError("ClassMappedDetector: the class map's model classes differ from the model's")
        self.model = model
        self.class_map = class_map
        self.class_names = list(class_map.target_names)
        self.input_size = tuple(model.input_size)
        self.taps = {k: f"model.{v}" for k, v in model.taps.items()}
        self._target_of = class_map.target_of
        self._first = [s if s is not None else -1 for s in class_map.first_sources]
        self._merges = any(len(s) > 1 for s in class_map.sources)
        self._warned_training = False

    @property
    def source_names(self) -> list[str]:
        return list(self.class_map.source_names)

    def extra_repr(self) -> str:
        return f"class_map={self.class_map.as_dict()}"

    # -- the contract ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor):
        return self.model(images)

    def predict(self, raw, conf_thres: float = 0.005, iou_thres: float = 0.45,
                max_det: int = 300) -> list[Detections]:
        dets = self.model.predict(raw, conf_thres=conf_thres, iou_thres=iou_thres,
                                  max_det=max(max_det, _INNER_MAX_DET))
        out = []
        for d in dets:
            table = torch.tensor(self._target_of, dtype=torch.long, device=d.labels.device)
            labels = table[d.labels]
            keep = labels >= 0
            boxes, scores, labels = d.boxes[keep], d.scores[keep], labels[keep]
            if self._merges and labels.numel():
                order = batched_nms(boxes.float(), scores.float(), labels, iou_thres)
            else:
                order = torch.arange(labels.numel(), device=labels.device)
            order = order[:max_det]
            out.append(Detections(boxes[order], scores[order], labels[order]))
        return out

    def loss(self, raw, targets: torch.Tensor, ignore: list[torch.Tensor] | None = None):
        if self.training and not self._warned_training:
            self._warned_training = True
            warnings.warn(f"training a class-mapped model: its {len(self.source_names)}-class head is kept and "
                          "trained through the class map; reset_head: true trains a head of data.classes instead",
                          stacklevel=2)
        t = torch.as_tensor(targets, dtype=torch.float32)
        if t.numel() == 0:
            return self.model.loss(raw, t.reshape(0, 6), ignore)
        t = t.clone()
        first = torch.tensor(self._first, dtype=torch.long, device=t.device)
        cls = t[:, 1].long()
        if ((cls < 0) | (cls >= len(self._first))).any():
            raise ValueError(f"targets: class must be in [0, {len(self._first) - 1}], found {sorted(set(cls.tolist()))}")
        src = first[cls]
        keep = src >= 0
        if not keep.all():  # a dataset class the model has no class for: DontCare
            first_raw = raw[0] if isinstance(raw, (list, tuple)) else raw
            batch = int(first_raw.shape[0])
            ignore = [torch.zeros(0, 4).to(t) if ignore is None or ignore[b] is None
                      else torch.as_tensor(ignore[b]).reshape(-1, 4).to(t) for b in range(batch)]
            for row in t[~keep]:
                b = int(row[0])
                ignore[b] = torch.cat([ignore[b], row[2:6].reshape(1, 4)])
        t = t[keep]
        t[:, 1] = src[keep].to(t.dtype)
        return self.model.loss(raw, t, ignore)

    # -- hooks -------------------------------------------------------------------------------
    def distill_outputs(self, raw) -> dict[str, torch.Tensor] | None:
        out = self.model.distill_outputs(raw)
        if out is None or "cls" not in out:
            return out
        cls = out["cls"]
        cols = []
        for srcs in self.class_map.sources:
            if not srcs:
                cols.append(torch.full_like(cls[..., 0], ABSENT_LOGIT))
            elif len(srcs) == 1:
                cols.append(cls[..., srcs[0]])
            else:
                cols.append(cls[..., list(srcs)].amax(dim=-1))
        return {**out, "cls": torch.stack(cols, dim=-1)}

    def objectness_maps(self, raw):
        return self.model.objectness_maps(raw)

    def prediction_convs(self) -> list[str]:
        return [f"model.{p}" for p in self.model.prediction_convs()]

    def fixed_convs(self) -> dict[str, str]:
        return {f"model.{p}": why for p, why in self.model.fixed_convs().items()}

    def activation_blocks(self) -> list[tuple[str, str | None, str]]:
        return [(f"model.{c}", None if b is None else f"model.{b}", f"model.{a}")
                for c, b, a in self.model.activation_blocks()]

    def with_classes(self, class_names: Sequence[str], sources: Sequence[int | None]) -> Detector:
        """Head transfer of the wrapped model (``sources`` index the model's own classes)."""
        return self.model.with_classes(class_names, sources)

    def skeleton(self) -> dict[str, Any]:
        raise NotImplementedError(
            "a class-mapped model (class_map without reset_head) is not exported: export its student (whose head "
            "is resized to data.classes) or a teacher built with reset_head: true")

    # -- head transfer -------------------------------------------------------------------------
    def transferred(self) -> Detector:
        """The wrapped model with its prediction layers resized to the dataset's classes, each
        initialised from the first model class mapped to it (a plain model of its family)."""
        return self.model.with_classes(self.class_names, self.class_map.first_sources)


def adapt_classes(model: Detector, data_classes: Sequence[str], class_map: Mapping[str, str] | None,
                  reset_head: bool, key: str = "teacher", names_hint: str = "") -> Detector:
    """`model` (built with its own classes) made a detector of ``data_classes``: unchanged when its
    classes are already those (and nothing asks otherwise); with ``reset_head`` a head transfer
    (`Detector.with_classes`, rows from the class map or, without one, from equally named
    classes); else, with a class map, a :class:`ClassMappedDetector`. A model of other classes with
    neither is a :class:`ClassMapError` saying which of the two to use."""
    data = [str(c) for c in data_classes]
    own = [str(c) for c in model.class_names]
    if class_map is None and not reset_head:
        if own == data:
            return model
        raise ClassMapError(class_options_help(key, own, len(own), data))
    cmap = resolve_class_map(own, data, class_map, key, names_hint)
    if reset_head:
        if cmap.is_identity:
            return model
        return model.with_classes(data, cmap.first_sources)
    return ClassMappedDetector(model, cmap)


def names_hint_for(names: Sequence[str], names_file: str | None, key: str = "teacher") -> str:
    """Where the model's class names came from, for an unknown-class error."""
    if names_file:
        return f" (read from {key}.names {names_file})"
    if carries_no_names(names):
        return f"; the model carries no class names: set {key}.names to its names file (one class per line)"
    return " (carried by the model)"


def dataset_model(model: Detector) -> Detector:
    """A model predicting its ``class_names`` in its own head: a :class:`ClassMappedDetector`
    becomes its head-transferred model (`ClassMappedDetector.transferred`); others are returned
    as they are. The student of a class-mapped teacher is built so."""
    return model.transferred() if isinstance(model, ClassMappedDetector) else model


__all__ = ["ABSENT_LOGIT", "ClassMap", "ClassMapError", "ClassMappedDetector", "adapt_classes",
           "carries_no_names", "class_options_help", "dataset_model", "names_hint_for", "read_names",
           "resolve_class_map"]
