"""`Distiller`: a frozen teacher, a student, taps, adapters and weighted distillation terms.

``total = det_weight * student.loss(raw, targets, ignore) + sum_k w_k * L_k(student, teacher)``
with each term logged separately ("det/box", "kd/mimic_l2@stride16", ...), as in Xu et al.
(ICRA 2019), where a binary-weight YOLOv2 learns the detection loss and to mimic the float
teacher's feature maps at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd_bnn.config import DistillTermConfig
from kd_bnn.distill.adapters import build_adapter
from kd_bnn.distill.losses import DISTILL_LOSSES, DistillContext, DistillLoss
from kd_bnn.distill.taps import FeatureTaps, TapError, resolve_tap, unwrap_model


@dataclass
class _Term:
    key: str  # log name, e.g. "kd/mimic_l2@stride16"
    loss: DistillLoss
    weight: float
    student_tap: str | None
    teacher_tap: str | None
    adapter_key: str | None


def _as_term_config(term: Any, index: int) -> DistillTermConfig:
    if isinstance(term, DistillTermConfig):
        return term
    if isinstance(term, dict):
        try:
            return DistillTermConfig.model_validate(term)
        except Exception as exc:
            raise ValueError(f"distill term {index}: {exc}") from None
    raise TypeError(f"distill term {index}: expected DistillTermConfig or dict, found {type(term).__name__}")


class Distiller(nn.Module):
    """Train a student against a frozen teacher.

    Args:
        teacher: the full-precision detector; frozen (requires_grad False), kept in eval mode,
            run under ``torch.no_grad``.
        student: the detector being trained (its ``loss`` gives the detection loss).
        terms: `DistillTermConfig` (or dicts): loss name, weight, teacher / student tap (a
            Detector ``taps`` name or a raw module path; the student tap defaults to the
            teacher's), and loss options.
        det_weight: weight of the student's own detection loss.
        input_size: (H, W) of the probe input used to build adapters; defaults to the
            student's ``input_size``. ``probe=False`` builds adapters at the first forward
            instead (then create the optimizer after that forward).
        adapter_bn: BatchNorm after the 1x1 channel adapters.

    Raises:
        ValueError: when teacher and student predict different classes.
        TapError: when a tap does not exist (with close matches).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module,
                 terms: Sequence[DistillTermConfig | dict], det_weight: float = 1.0,
                 input_size: tuple[int, int] | None = None, probe: bool = True,
                 adapter_bn: bool = True) -> None:
        super().__init__()
        t_names = getattr(teacher, "class_names", None)
        s_names = getattr(student, "class_names", None)
        if t_names is not None and s_names is not None and list(t_names) != list(s_names):
            raise ValueError(f"teacher and student predict different classes: teacher {list(t_names)}, "
                             f"student {list(s_names)}")
        self.teacher = teacher
        self.student = student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.det_weight = float(det_weight)
        self.adapter_bn = adapter_bn
        self.adapters = nn.ModuleDict()
        self.terms: list[_Term] = []
        t_paths: dict[str, str] = {}
        s_paths: dict[str, str] = {}
        seen: dict[str, int] = {}
        for i, raw_term in enumerate(terms):
            cfg = _as_term_config(raw_term, i)
            try:
                loss = DISTILL_LOSSES.build(cfg.loss, **cfg.options)
            except TypeError as exc:
                raise ValueError(f"distill term {i} ({cfg.loss}): bad options {cfg.options}: {exc}") from None
            if loss.level == "feature":
                t_tap = cfg.teacher or cfg.student
                s_tap = cfg.student or cfg.teacher
                if t_tap is None:
                    raise ValueError(f"distill term {i} ({cfg.loss}): a feature loss needs a "
                                     "'teacher' and/or 'student' tap")
                try:
                    t_paths[t_tap] = resolve_tap(teacher, t_tap)
                except TapError as exc:
                    raise TapError(f"distill term {i} ({cfg.loss}), teacher: {exc}") from None
                try:
                    s_paths[s_tap] = resolve_tap(student, s_tap)
                except TapError as exc:
                    raise TapError(f"distill term {i} ({cfg.loss}), student: {exc}") from None
                where = s_tap if s_tap == t_tap else f"{s_tap}->{t_tap}"
                key = f"kd/{cfg.loss}@{where}"
                adapter_key = f"term{i}"
            else:
                t_tap = s_tap = adapter_key = None
                key = f"kd/{cfg.loss}"
            if key in seen:
                seen[key] += 1
                key = f"{key}#{seen[key]}"
            else:
                seen[key] = 0
            self.terms.append(_Term(key, loss, float(cfg.weight), s_tap, t_tap, adapter_key))
        self.losses = nn.ModuleList([t.loss for t in self.terms])
        self._t_taps = FeatureTaps(teacher, t_paths) if t_paths else None
        self._s_taps = FeatureTaps(student, s_paths) if s_paths else None
        self._built = not any(t.adapter_key for t in self.terms)
        self.input_size = tuple(input_size) if input_size is not None else getattr(student, "input_size", None)
        if probe and not self._built:
            if self.input_size is None:
                raise ValueError("Distiller: give input_size (the student has no input_size) or probe=False")
            self.probe()

    # -- adapters -----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        for p in self.student.parameters():
            return p.device
        return torch.device("cpu")

    def probe(self, images: torch.Tensor | None = None) -> None:
        """Run one forward of both models (no grad, eval mode) to build the adapters."""
        if images is None:
            h, w = self.input_size
            images = torch.zeros((1, 3, int(h), int(w)), device=self._device())
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                self.teacher(images)
                self.student(images)
                self._build_adapters(self._s_taps.features, self._t_taps.features)
        finally:
            self.student.train(was_training)
            self._clear()

    def _build_adapters(self, s_feats: dict, t_feats: dict) -> None:
        dev = self._device()
        for term in self.terms:
            if term.adapter_key is None:
                continue
            s, t = self._feature(s_feats, term.student_tap, "student"), self._feature(t_feats, term.teacher_tap, "teacher")
            adapter = build_adapter(s.shape, t.shape, match_channels=term.loss.match_channels, bn=self.adapter_bn)
            self.adapters[term.adapter_key] = adapter.to(dev)
        self._built = True

    @staticmethod
    def _feature(feats: dict, name: str | None, who: str) -> torch.Tensor:
        if name not in feats:
            raise TapError(f"{who} tap {name!r} recorded nothing in the forward (did the module run?)")
        x = feats[name]
        if not torch.is_tensor(x):
            raise TypeError(f"{who} tap {name!r} produced a {type(x).__name__}, not a tensor; "
                            "tap a module whose output is a single feature map")
        return x

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the distiller itself trains (the adapters), for the optimizer."""
        return [p for p in self.adapters.parameters() if p.requires_grad]

    # -- training -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # the teacher always runs in eval mode (frozen BN statistics)
        return self

    def _clear(self) -> None:
        for taps in (self._t_taps, self._s_taps):
            if taps is not None:
                taps.clear()

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                ignore: list[torch.Tensor] | None = None,
                student_fn: Callable[[torch.Tensor], Any] | None = None,
                ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """One distillation step's forward.

        Args:
            images, targets, ignore: a batch (see `kd_bnn.models.detector`).
            student_fn: what to call for the student's forward (e.g. its DDP wrapper); the
                detection loss is still computed by the unwrapped student's ``loss``.

        Returns:
            (student raw outputs, total loss, {part name: detached value}).
        """
        self.teacher.eval()
        try:
            with torch.no_grad():
                t_raw = self.teacher(images)
            t_feats = dict(self._t_taps.features) if self._t_taps is not None else {}
            s_raw = (student_fn or self.student)(images)
            s_feats = dict(self._s_taps.features) if self._s_taps is not None else {}
        finally:
            self._clear()
        if not self._built:
            self._build_adapters(s_feats, t_feats)
        student = unwrap_model(self.student)
        det_total, det_parts = student.loss(s_raw, targets, ignore)
        parts: dict[str, torch.Tensor] = {f"det/{k}": v.detach() for k, v in det_parts.items()}
        total = det_total * self.det_weight if self.det_weight != 1.0 else det_total
        if self.det_weight != 1.0:
            parts = {k: v * self.det_weight for k, v in parts.items()}
        ctx = DistillContext(targets=targets, ignore=ignore, image_size=tuple(images.shape[-2:]),
                             student_model=student, teacher_model=self.teacher,
                             extra={"teacher_raw": t_raw})
        for term in self.terms:
            if term.adapter_key is not None:
                s = self.adapters[term.adapter_key](self._feature(s_feats, term.student_tap, "student"))
                t = self._feature(t_feats, term.teacher_tap, "teacher")
                value = term.loss(s, t, ctx)
            else:
                value = term.loss(s_raw, t_raw, ctx)
            weighted = value * term.weight
            total = total + weighted.to(total.dtype)
            parts[term.key] = weighted.detach()
        return s_raw, total, parts

    def remove_taps(self) -> None:
        """Detach the distiller's hooks from both models (e.g. before exporting the student)."""
        for taps in (self._t_taps, self._s_taps):
            if taps is not None:
                taps.remove()
        self._t_taps = self._s_taps = None

    def term_keys(self) -> list[str]:
        """Log names of the distillation terms, in config order."""
        return [t.key for t in self.terms]


def build_distiller(teacher: nn.Module, student: nn.Module, terms: Iterable[DistillTermConfig | dict],
                    **kwargs: Any) -> Distiller:
    """Convenience wrapper: `Distiller(teacher, student, list(terms), **kwargs)`."""
    return Distiller(teacher, student, list(terms), **kwargs)
