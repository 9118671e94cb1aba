"""Run plots (matplotlib, Agg backend): loss curves, KITTI precision-recall curves, and a grid of
validation images with predicted and true boxes."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_bnn.io import atomic_path

DIFFICULTIES = ("easy", "moderate", "hard")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    _plt().close(fig)
    return path


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of metrics.csv as float lists (blank -> NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for k in (rows[0].keys() if rows else []):
        vals = []
        for r in rows:
            try:
                vals.append(float(r.get(k, "")))
            except (TypeError, ValueError):
                vals.append(math.nan)
        cols[k] = vals
    return cols


def plot_loss_curves(metrics_csv: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Loss parts per epoch (left), LR (middle) and the validation AP_R40 moderate per class and
    mAP (right) from metrics.csv; legends beside the panels, never over the curves."""
    plt = _plt()
    cols = read_metrics_csv(metrics_csv)
    epochs = cols.get("epoch", [])
    loss_keys = [k for k in cols if k == "loss" or k.startswith(("det/", "kd/"))]
    metric_keys = [k for k in cols if k.endswith("/moderate/R40") and not k.startswith(("det/", "kd/"))]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5), gridspec_kw={"wspace": 0.55})
    for k in loss_keys:
        axes[0].plot(epochs, cols[k], marker=".", label=k)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("epoch")
    if any(v > 0 for k in loss_keys for v in cols[k] if math.isfinite(v)):
        axes[0].set_yscale("log")
    if "lr" in cols:
        axes[1].plot(epochs, cols["lr"], marker=".")
    axes[1].set_title("learning rate (end of epoch)")
    axes[1].set_xlabel("epoch")
    for k in metric_keys:
        xs = [e for e, v in zip(epochs, cols[k]) if math.isfinite(v)]
        ys = [v for v in cols[k] if math.isfinite(v)]
        axes[2].plot(xs, ys, marker="o", markersize=6, label=k.split("/")[0])
    axes[2].set_title("validation AP_R40, moderate")
    axes[2].set_xlabel("epoch")
    finite = [e for e in epochs if math.isfinite(e)]
    if finite:  # the whole run's epochs: a single evaluation sits at its epoch, not mid-panel
        axes[2].set_xlim(min(finite) - 0.5, max(finite) + 0.5)
    for ax in (axes[0], axes[2]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, out)


def plot_pr_curves(result: Any, out: str | os.PathLike) -> Path:
    """Per-class precision-recall curves, one line per difficulty.

    `result` has ``precision`` and ``recall``: {class: (3, n) arrays, rows easy/moderate/hard}
    (as `kd_bnn.eval.kitti.KittiEvalResult`), optionally ``ap`` for the legend.
    """
    plt = _plt()
    classes = list(result.precision)
    fig, axes = plt.subplots(1, max(len(classes), 1), figsize=(5 * max(len(classes), 1), 4), squeeze=False)
    for ax, cls in zip(axes[0], classes):
        prec = np.asarray(result.precision[cls], dtype=float)
        rec = np.asarray(result.recall[cls], dtype=float)
        for d, name in enumerate(DIFFICULTIES[: prec.shape[0]]):
            ok = np.isfinite(rec[d]) & np.isfinite(prec[d])
            label = name
            ap = getattr(result, "ap", {}).get(cls, {}).get("R40", {}).get(name)
            if ap is not None:
                label += f" (AP_R40 {ap:.1f})"
            ax.plot(rec[d][ok], prec[d][ok], label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(cls)
        ax.legend(fontsize=8)
    return _save(fig, out)


def draw_boxes(ax: Any, boxes: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
               scores: Sequence[float] | None = None, truth: bool = False) -> None:
    """Boxes in their class colour (`kd_bnn.eval.report.CLASS_COLOURS`, as `kd-bnn predict` draws
    them): predictions solid with ``class score``, ground truth dashed with its class name."""
    import matplotlib.patches as patches

    from kd_bnn.eval.report import class_colour

    for i, (b, lab) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = (float(v) for v in b)
        color = tuple(c / 255.0 for c in class_colour(int(lab)))
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                                       linewidth=1.0 if truth else 1.6, linestyle="--" if truth else "-"))
        name = class_names[int(lab)] if 0 <= int(lab) < len(class_names) else str(int(lab))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        ax.text(x1, y2 + 9 if truth else y1 - 3, text, color=color, fontsize=8,
                bbox={"facecolor": "black", "alpha": 0.45, "pad": 0.6, "linewidth": 0})


@torch.no_grad()
def plot_validation_grid(model: torch.nn.Module, loader: Iterable, out: str | os.PathLike,
                         class_names: Sequence[str] = (), device: torch.device | str = "cpu",
                         max_images: int = 6, conf_thres: float = 0.25, iou_thres: float = 0.45) -> Path:
    """Predicted (solid, with scores) and true (dashed) boxes in their class colours on the first
    validation images, two wide tiles a row (KITTI frames are ~3.3:1), large enough to read."""
    from kd_bnn.data.loader import unpack_batch

    plt = _plt()
    images, targets, _, _ = unpack_batch(next(iter(loader)))
    images = images[:max_images]
    was = model.training
    model.eval()
    try:
        dets = model.predict(model(images.to(device)), conf_thres=conf_thres, iou_thres=iou_thres)
    finally:
        model.train(was)
    n = images.shape[0]
    h, w = images.shape[-2:]
    cols = min(n, 2 if w >= 2 * h else 3)
    rows = math.ceil(n / cols)
    tile_w = 8.0 if w >= 2 * h else 5.0
    fig, axes = plt.subplots(rows, cols, figsize=(tile_w * cols, tile_w * h / w * rows + 0.6), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        t = targets[targets[:, 0] == i].cpu()
        draw_boxes(ax, t[:, 2:6].numpy(), t[:, 1].long().tolist(), class_names, truth=True)
        d = dets[i]
        draw_boxes(ax, d.boxes.cpu().numpy(), d.labels.cpu().tolist(), class_names, d.scores.cpu().tolist())
    fig.suptitle("validation: predictions solid (class score), ground truth dashed; one colour per class",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
