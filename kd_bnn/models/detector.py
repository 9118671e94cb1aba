"""The `Detector` interface every model family meets, and the detector registry.

The trainer, distiller, evaluator and exporter only use this interface:
``forward(images) -> raw``, ``loss(raw, targets, ignore) -> (total, parts)``,
``predict(raw, conf_thres, iou_thres) -> list[Detections]``, ``taps`` and ``input_size``.

Conventions (docs/architecture.md, "The Detector contract"):
  * images: float32 (B, 3, H, W) in [0, 1], letterboxed to ``input_size``.
  * input_size: (height, width) in pixels.
  * targets: one tensor (N, 6) per batch, rows ``(image_index, class, x1, y1, x2, y2)`` in
    input pixels; ignore: a list of B tensors (M_i, 4) of DontCare boxes x1y1x2y2 in input
    pixels, which are neither positive nor negative in the loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from kd_bnn.registry import Registry

#: name -> factory(**kwargs) -> Detector (e.g. "darknet", "mobilenet_yolo", "ultralytics").
DETECTORS = Registry("detector")


class ClassCountError(ValueError):
    """The class names given to a family do not match the number of classes its model predicts
    (e.g. 3 KITTI names for an 80-class COCO cfg). ``model_classes``: what the model predicts;
    ``given``: the number of names; ``model_names``: the model's own names when it carries them.
    `kd_bnn.engine.build` turns it into the config error naming ``names`` / ``class_map`` /
    ``reset_head``."""

    def __init__(self, message: str, *, model_classes: int, given: int,
                 model_names: Sequence[str] | None = None):
        super().__init__(message)
        self.model_classes = int(model_classes)
        self.given = int(given)
        self.model_names = list(model_names) if model_names is not None else None


@dataclass
class Detections:
    """Detections of one image: boxes x1y1x2y2 in input pixels, scores, integer labels."""

    boxes: torch.Tensor  # (K, 4) float
    scores: torch.Tensor  # (K,) float
    labels: torch.Tensor  # (K,) int64

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    @staticmethod
    def empty(device=None) -> Detections:
        return Detections(torch.zeros((0, 4), device=device), torch.zeros(0, device=device),
                          torch.zeros(0, dtype=torch.long, device=device))


class PackedOps(Protocol):
    """What the packed runtime (`kd_bnn.deploy.runtime`) offers a family's packed graph walk."""

    def is_packed_conv(self, conv: nn.Module) -> bool: ...  # a conv holding packed binary weights
    def chainable_xnor(self, conv: nn.Module) -> bool: ...  # a packed XNOR conv the kernel runs on packed input
    def is_packed(self, x: torch.Tensor) -> bool: ...  # x holds packed sign words (N, H, W, words)
    def pack(self, x: torch.Tensor) -> torch.Tensor: ...  # float NCHW -> packed signs
    def xnor(self, conv: nn.Module, x: torch.Tensor, packed_out: bool) -> torch.Tensor: ...
    # the fused epilogue of packed chains: float act(conv) + residual and/or packed words for the
    # next conv (signs of the float output, or popcount bounds from sign_bounds) from one kernel pass
    def xnor_fused(self, conv: nn.Module, x: torch.Tensor, *, residual: torch.Tensor | None = None,
                   packed_for: nn.Module | None = None, bounds: Any = None, float_out: bool = True,
                   x_padded: bool = False, table: Any = None) -> Any: ...
    # fn(conv output) per channel, exact: a fused multiply-add where it is one, else tabulated
    def output_table(self, conv: nn.Module, fn: Any) -> Any: ...
    def sign_bounds(self, conv: nn.Module, predicate: Any) -> Any: ...  # bit = predicate(conv output), exact
    def sign_thresholds(self, predicate: Any, channels: int) -> Any: ...  # bit = predicate(x) as x >= t / x <= t
    # channel concat of packed words and float maps (binarized on the way)
    def concat_packed(self, parts: list, pad_for: nn.Module | None = None) -> torch.Tensor: ...


class Detector(nn.Module):
    """Base class of every detector family.

    Attributes:
        input_size: (height, width) the network expects.
        class_names: names of the classes predicted, in label order.
        taps: named feature points -> module paths (``dict(model.named_modules())`` keys), used
            by the distiller to hook intermediate maps (e.g. ``{"stride16": "backbone.12"}``).
    """

    input_size: tuple[int, int]
    class_names: list[str]
    taps: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, images: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement Detector.forward")

    def loss(self, raw, targets: torch.Tensor, ignore: list[torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement Detector.loss")

    def predict(self, raw, conf_thres: float = 0.005, iou_thres: float = 0.45,
                max_det: int = 300) -> list[Detections]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement Detector.predict")

    # -- optional hooks: generic rooms (binarize, distillation, export) ask the family, never
    # -- test its type. Defaults suit a plain single-output detector.
    def prediction_convs(self) -> list[str]:
        """Paths of the ``nn.Conv2d`` that produce the raw head maps (binarize keeps them float
        under ``keep_last``). Default: the last conv in registration order."""
        convs = [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)]
        return convs[-1:]

    def fixed_convs(self) -> dict[str, str]:
        """Convs binarize must always keep float, with the reason (e.g. fixed, non-trained
        weights). Default: none."""
        return {}

    def distill_outputs(self, raw) -> dict[str, torch.Tensor] | None:
        """Per-prediction view of ``raw`` for output-level distillation: ``obj`` (B, K) logits,
        ``cls`` (B, K, C) logits, ``box`` (B, K, 4) x1y1x2y2 input pixels (any may be missing);
        None when the family has no such view."""
        return None

    def objectness_maps(self, raw) -> list[torch.Tensor] | None:
        """Per head, the (B, H, W) objectness probability (max over anchors) of ``raw``: where
        the model sees objects (object-region distillation). None when the family has none."""
        return None

    def with_classes(self, class_names: Sequence[str], sources: Sequence[int | None]) -> Detector:
        """Head transfer: a new model of this family predicting ``class_names``, every weight
        copied from this one except the prediction layers' class outputs, which are resized: class
        ``j`` starts from this model's class ``sources[j]`` (its weights and bias), or fresh when
        ``sources[j]`` is None; box and objectness outputs are kept. This model is left unchanged.
        Used by ``reset_head`` and to give the student of a class-mapped teacher the dataset's
        classes (`kd_bnn.models.classmap`). Default: not offered by the family."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot resize its prediction layers to other classes (head transfer: "
            "teacher.reset_head, or the student of a class-mapped teacher); families that can: darknet, ultralytics")

    def activation_blocks(self) -> list[tuple[str, str | None, str]]:
        """``(conv, bn, act)`` module paths whose output is exactly ``act(bn(conv(x)))`` (``bn``
        None when absent): the packed runtime fuses such an activation into a binary conv's kernel.
        Default: none (the runtime still finds ``conv, [bn], act`` runs in plain Sequentials)."""
        return []

    def packed_plan(self, ops: PackedOps) -> Any | None:
        """For the packed runtime: which layers may pass packed sign words to their consumers
        (whatever ``packed_forward`` reads), or None when the family has no packed graph walk."""
        return None

    def packed_forward(self, images: torch.Tensor, plan: Any, ops: PackedOps):  # pragma: no cover - interface
        """``forward`` with the layers of ``plan`` passing packed bits, using the runtime's ``ops``."""
        raise NotImplementedError(f"{type(self).__name__} has no packed graph walk")

    def skeleton(self) -> dict[str, Any]:
        """What rebuilds this model's float module tree with no weights, as plain data: ``{"family":
        F, "options": {...}}`` checked by :func:`check_skeleton` (inverse: :func:`build_from_skeleton`).
        Factories record it; a model built another way cannot be exported without one."""
        sk = getattr(self, "_skeleton", None)
        if sk is None:
            raise NotImplementedError(f"{type(self).__name__} records no skeleton (build it through its "
                                      "registered factory, kd_bnn.models.build_detector)")
        return {"family": sk["family"], "options": dict(sk["options"])}

    def set_skeleton(self, family: str, options: Mapping[str, Any]) -> None:
        """Record the factory call that built this model (see :meth:`skeleton`); factories pass their
        architecture options, never weight paths or ``trust``. Tuples are stored as lists (JSON)."""
        self._skeleton = {"family": family, "options": {k: _plain(v) for k, v in options.items()}}


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def build_detector(family: str, **kwargs) -> Detector:
    """Build a registered detector family by name (see ``DETECTORS.list()``)."""
    return DETECTORS.build(family, **kwargs)


# ---------------------------------------------------------------------------- skeletons
#
# A ``.kdbnn`` file is data: the module tree it describes (its *skeleton*) is rebuilt from a
# registered family name plus plain-value options checked against that family's schema, never
# from a file the skeleton names, never with ``trust``, never through anything that unpickles
# (docs/architecture.md, "The .kdbnn file").

#: Value kinds a skeleton option may have; a trailing ``?`` also admits ``None``.
SKELETON_KINDS = ("bool", "int", "float", "name", "text", "ints", "floats", "anchors")
_MAX_TEXT = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")


class SkeletonError(ValueError):
    """A skeleton (family + options) that may not be rebuilt: unknown family, unknown option
    key, a value of the wrong kind."""


@dataclass(frozen=True)
class SkeletonSchema:
    """What a family's skeleton may hold: ``options`` maps each admitted key to a kind of
    :data:`SKELETON_KINDS`; ``build(class_names, input_size, options)`` rebuilds the float module
    tree with no weights (default: the registered factory with those keyword options)."""

    options: Mapping[str, str]
    build: Callable[..., Detector] | None = None


#: family -> :class:`SkeletonSchema`. A family absent here cannot be rebuilt from a ``.kdbnn``.
SKELETONS: dict[str, SkeletonSchema] = {}


def register_skeleton(family: str, options: Mapping[str, str],
                      build: Callable[..., Detector] | None = None) -> None:
    """Declare the plain-value options a ``.kdbnn`` skeleton of ``family`` may carry."""
    for key, kind in options.items():
        if kind.rstrip("?") not in SKELETON_KINDS:
            raise ValueError(f"skeleton option {family}.{key}: unknown kind {kind!r}; kinds: {SKELETON_KINDS}")
    SKELETONS[family] = SkeletonSchema(dict(options), build)


def _is_num(v: Any, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) if integer else math.isfinite(v)


def _kind_ok(v: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return v is None or _kind_ok(v, kind[:-1])
    if kind == "bool":
        return isinstance(v, bool)
    if kind in ("int", "float"):
        return _is_num(v, kind == "int")
    if kind == "name":
        return isinstance(v, str) and _NAME.fullmatch(v) is not None
    if kind == "text":  # a description the family parses itself (e.g. a Darknet cfg)
        return isinstance(v, str) and len(v) <= _MAX_TEXT
    if kind in ("ints", "floats"):
        one = kind[:-1]
        return _kind_ok(v, one) or (isinstance(v, list) and 0 < len(v) <= 64 and all(_kind_ok(x, one) for x in v))
    if kind == "anchors":
        return (isinstance(v, list) and 0 < len(v) <= 64
                and all(isinstance(a, list) and len(a) == 2 and all(_is_num(x, False) and x > 0 for x in a)
                        for a in v))
    return False


def check_skeleton(family: Any, options: Any) -> dict[str, Any]:
    """The options of a skeleton, checked against the family's schema (:class:`SkeletonError`
    naming the family, key, expected kind and value found otherwise)."""
    if not isinstance(family, str) or family not in SKELETONS:
        raise SkeletonError(f"skeleton family {family!r} cannot be rebuilt from a .kdbnn; "
                            f"rebuildable families: {', '.join(sorted(SKELETONS))}")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise SkeletonError(f"skeleton options of {family}: expected a mapping, found {type(options).__name__}")
    schema = SKELETONS[family].options
    unknown = sorted(str(k) for k in options if k not in schema)
    if unknown:
        raise SkeletonError(f"skeleton options of {family}: unknown keys {unknown}; "
                            f"allowed: {', '.join(sorted(schema)) or 'none'}")
    for key, value in options.items():
        if not _kind_ok(value, schema[key]):
            raise SkeletonError(f"skeleton option {family}.{key}: expected {schema[key]}, found {value!r:.80}")
    return dict(options)


def build_from_skeleton(family: Any, options: Any, class_names: Sequence[str],
                        input_size: tuple[int, int]) -> Detector:
    """Rebuild a registered family's float module tree from checked skeleton options."""
    opts = check_skeleton(family, options)
    spec = SKELETONS[family]
    if spec.build is not None:
        return spec.build(list(class_names), tuple(input_size), opts)
    return build_detector(family, class_names=list(class_names), input_size=tuple(input_size), **opts)
