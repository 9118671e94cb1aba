"""Teacher-student feature taps paired by stride, for distillation across architectures.

A teacher and a student of different shapes (DarkNet-19 YOLOv2 vs BinaryDenseNet-YOLO) still
share the strides of their feature maps (1/8, 1/16, 1/32 of the input). Mimic losses (FitNets,
Romero et al. 2015; Xu et al. 2019) compare maps of the same stride, a 1x1 adapter fixing the
channel count. This module finds every tap's stride with one zero-input probe forward and
checks that the pairs a config names agree. (It lives in `models` so that `distill` may use it;
it hooks modules itself and imports nothing from `distill`.)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


class TapStrideError(ValueError):
    """A teacher tap and a student tap of different strides were paired."""


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def tap_path(model: nn.Module, tap: str) -> str:
    """Module path of a tap given by its ``taps`` name or as a module path (ValueError with close matches)."""
    model = _unwrap(model)
    taps = getattr(model, "taps", None) or {}
    modules = dict(model.named_modules())
    if tap in taps and taps[tap] in modules:
        return taps[tap]
    if tap in modules:
        return tap
    close = difflib.get_close_matches(tap, list(taps) + [m for m in modules if m], n=5, cutoff=0.5)
    raise ValueError(
        f"{type(model).__name__} has no tap or module path {tap!r}; closest: {close or 'none'}; "
        f"named taps: {sorted(taps) or 'none'}"
    )


@torch.no_grad()
def tap_strides(
    model: nn.Module, input_size: Sequence[int], taps: Iterable[str] | None = None
) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{tap: (stride, output shape)} from one forward of zeros (eval mode, batch 1).

    ``taps`` defaults to the model's named ``taps``; module paths are accepted too. The stride is
    input height / map height; a map whose height and width strides differ, or that do not
    divide the input, is an error naming the tap.
    """
    model = _unwrap(model)
    names = list(taps) if taps is not None else list(getattr(model, "taps", {}) or {})
    modules = dict(model.named_modules())
    paths = {n: tap_path(model, n) for n in names}
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for n, p in paths.items():

        def hook(_m: nn.Module, _i: Any, out: Any, n: str = n) -> None:
            if torch.is_tensor(out):
                shapes[n] = tuple(out.shape)

        handles.append(modules[p].register_forward_hook(hook))
    h, w = (int(v) for v in input_size)
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, h, w, device=dev))
    finally:
        model.train(was_training)
        for hd in handles:
            hd.remove()
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for n in names:
        if n not in shapes or len(shapes[n]) != 4:
            raise ValueError(
                f"tap {n!r} ({paths[n]}) of {type(model).__name__} produced no 4-D feature map "
                f"in a forward at {h}x{w}"
            )
        fh, fw = shapes[n][-2:]
        if h % fh or w % fw or h // fh != w // fw:
            raise ValueError(
                f"tap {n!r} ({paths[n]}) of {type(model).__name__}: map {fh}x{fw} for input {h}x{w} "
                "has no single integer stride"
            )
        out[n] = (h // fh, shapes[n])
    return out


def match_taps_by_stride(
    teacher: nn.Module, student: nn.Module, input_size: Sequence[int]
) -> list[tuple[str, str, int]]:
    """One (teacher_tap, student_tap, stride) pair per stride both models have, sorted by stride.

    On each side the tap named ``stride{s}`` is preferred (the `Detector` convention), else the
    first tap of that stride in ``taps`` order; other taps of the same stride (``head``,
    ``head_in``) can still be paired explicitly in a config.
    """
    t = tap_strides(teacher, input_size)
    s = tap_strides(student, input_size)

    def pick(strides: dict[str, tuple[int, tuple[int, ...]]], stride: int) -> str:
        names = [n for n, (st, _) in strides.items() if st == stride]
        return f"stride{stride}" if f"stride{stride}" in names else names[0]

    common = sorted({st for st, _ in t.values()} & {st for st, _ in s.values()})
    return [(pick(t, st), pick(s, st), st) for st in common]


def check_tap_pairs(
    teacher: nn.Module, student: nn.Module, pairs: Iterable[Any], input_size: Sequence[int]
) -> list[tuple[str, str, int]]:
    """Verify that every (teacher tap, student tap) pair has equal strides; return them with the stride.

    ``pairs`` holds (teacher, student) tuples or distill-term configs / dicts with ``teacher`` and
    ``student`` keys (output-level terms without taps are skipped; a missing side defaults to the
    other, as the Distiller does).

    Raises:
        TapStrideError: naming both taps, their module paths and both strides.
    """
    items = []
    for i, p in enumerate(pairs):
        if isinstance(p, dict):
            t_tap, s_tap = p.get("teacher"), p.get("student")
        elif hasattr(p, "teacher") and hasattr(p, "student"):
            t_tap, s_tap = p.teacher, p.student
        else:
            t_tap, s_tap = p
        if t_tap is None and s_tap is None:
            continue
        items.append((i, t_tap or s_tap, s_tap or t_tap))
    if not items:
        return []
    t = tap_strides(teacher, input_size, sorted({it[1] for it in items}))
    s = tap_strides(student, input_size, sorted({it[2] for it in items}))
    out = []
    for i, t_tap, s_tap in items:
        ts, ss = t[t_tap][0], s[s_tap][0]
        if ts != ss:
            same = sorted(n for n, (st, _) in tap_strides(student, input_size).items() if st == ts)
            hint = f"; student taps of stride {ts}: {same}" if same else ""
            raise TapStrideError(
                f"distill pair {i}: teacher tap {t_tap!r} ({tap_path(teacher, t_tap)}) has stride {ts} but "
                f"student tap {s_tap!r} ({tap_path(student, s_tap)}) has stride {ss}; pair taps of equal "
                f"stride{hint}"
            )
        out.append((t_tap, s_tap, ts))
    return out
