"""Reports of evaluation results: text tables, JSON files and precision-recall plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kd_bnn.data.kitti import DIFFICULTIES

if TYPE_CHECKING:  # pragma: no cover
    from kd_bnn.eval.kitti import KittiEvalResult


#: One colour per class index (RGB, 0-255), shared by every drawing of boxes (`kd-bnn predict`'s
#: images, the training run's validation grid): Car green, Pedestrian red, Cyclist blue, then more.
CLASS_COLOURS = ((0, 200, 0), (230, 30, 30), (30, 120, 255), (255, 150, 0), (200, 0, 200), (0, 200, 200))


def class_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of class `index` (:data:`CLASS_COLOURS`, cycling)."""
    return CLASS_COLOURS[int(index) % len(CLASS_COLOURS)]


def _fmt(v: float) -> str:
    return "   nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"


def kitti_table(result: KittiEvalResult) -> str:
    """AP (percent) per class, difficulty and AP kind, one row per class.

    Example::

        KITTI 2D bbox AP (devkit protocol)    AP_R11                  AP_R40
        class        easy  moderate    hard      easy  moderate    hard
    """
    head = (f"{'class':<12}" + "".join(f"{'R11 ' + d:>14}" for d in DIFFICULTIES)
            + "".join(f"{'R40 ' + d:>14}" for d in DIFFICULTIES))
    lines = ["KITTI 2D bbox AP, percent (official devkit protocol)", head]
    for c, kinds in result.ap.items():
        vals = [kinds["R11"][d] for d in DIFFICULTIES] + [kinds["R40"][d] for d in DIFFICULTIES]
        note = "" if result.evaluated.get(c, True) else "  (no detections)"
        lines.append(f"{c:<12}" + "".join(f"{_fmt(v):>14}" for v in vals) + note)
    if result.ap:
        mean = [np.mean([k[kind][d] for k in result.ap.values()])
                for kind in ("R11", "R40") for d in DIFFICULTIES]
        lines.append(f"{'mean':<12}" + "".join(f"{_fmt(float(v)):>14}" for v in mean))
    gts = ", ".join(f"{c} {'/'.join(map(str, n))}" for c, n in result.num_gt.items())
    lines.append(f"frames: {result.num_frames}; valid ground truth (easy/moderate/hard): {gts}")
    if result.missing_results:
        lines.append(f"result files missing (no detections): {result.missing_results}")
    if result.unknown_classes:
        unk = ", ".join(f"{k} x{v}" for k, v in sorted(result.unknown_classes.items()))
        lines.append(f"unknown detection classes (ignored): {unk}")
    return "\n".join(lines)


def coco_table(coco: dict) -> str:
    """mAP@[.5:.95] and AP50 (percent) overall and per class."""
    lines = ["COCO-style bbox AP, percent (pycocotools)", f"{'class':<12}{'mAP':>10}{'AP50':>10}"]
    for c, d in coco["per_class"].items():
        lines.append(f"{c:<12}{_fmt(d['mAP']):>10}{_fmt(d['AP50']):>10}")
    lines.append(f"{'all':<12}{_fmt(coco['mAP']):>10}{_fmt(coco['AP50']):>10}")
    return "\n".join(lines)


def format_report(result: KittiEvalResult, coco: dict | None = None) -> str:
    """The KITTI table, with the COCO table beside it (below) when given."""
    out = kitti_table(result)
    if coco is not None:
        out += "\n\n" + coco_table(coco)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def report_dict(result: KittiEvalResult, coco: dict | None = None) -> dict:
    """``{"bbox_2d": {...}}`` plus ``"coco"`` when given (NaN written as null)."""
    out = result.to_json()
    if coco is not None:
        out["coco"] = coco
    return _jsonable(out)


def save_json(path: str | os.PathLike, result: KittiEvalResult, coco: dict | None = None) -> Path:
    """Write `report_dict` to `path` atomically."""
    from kd_bnn.io import atomic_write_text

    atomic_write_text(path, json.dumps(report_dict(result, coco), indent=2) + "\n")
    return Path(path)


def plot_pr_curves(result: KittiEvalResult, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per class with the devkit's interpolated precision at 41 recall points
    (easy/moderate/hard), like the devkit's ``<class>_detection.png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recall = np.linspace(0.0, 1.0, result.precision[next(iter(result.precision))].shape[1]) \
        if result.precision else np.zeros(0)
    paths = []
    for c, prec in result.precision.items():
        fig, ax = plt.subplots(figsize=(4.5, 3.15))
        for d, name in enumerate(DIFFICULTIES):
            ax.plot(recall, prec[d], lw=2,
                    label=f"{name.capitalize()} ({result.ap[c]['R40'][name]:.2f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("Recall")
        ax.set_ylabel("Precision")
        ax.set_title(c)
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        p = out_dir / f"{c.lower()}_detection.png"
        tmp = p.with_name(p.stem + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, p)
        paths.append(p)
    return paths


__all__ = ["CLASS_COLOURS", "class_colour", "coco_table", "format_report", "kitti_table", "plot_pr_curves", "report_dict", "save_json"]
