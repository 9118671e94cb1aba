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
    """Loss parts per epoch (left), LR (middle) and eval metrics (right) from metrics.csv."""
    plt = _plt()
    cols = read_metrics_csv(metrics_csv)
    epochs = cols.get("epoch", [])
    loss_keys = [k for k in cols if k == "loss" or k.startswith(("det/", "kd/"))]
    metric_keys = [k for k in cols if "/" in k and not k.startswith(("det/", "kd/"))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
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
        axes[2].plot(xs, ys, marker="o", label=k)
    axes[2].set_title("validation metrics")
    axes[2].set_xlabel("epoch")
    for ax in (axes[0], axes[2]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
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
               color: str, scores: Sequence[float] | None = None, dashed: bool = False) -> None:
    import matplotlib.patches as patches

    for i, (b, lab) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = (float(v) for v in b)
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                                       linewidth=1.2, linestyle="--" if dashed else "-"))
        name = class_names[int(lab)] if 0 <= int(lab) < len(class_names) else str(int(lab))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        ax.text(x1, y1 - 2, text, color=color, fontsize=6)


@torch.no_grad()
def plot_validation_grid(model: torch.nn.Module, loader: Iterable, out: str | os.PathLike,
                         class_names: Sequence[str] = (), device: torch.device | str = "cpu",
                         max_images: int = 8, conf_thres: float = 0.25, iou_thres: float = 0.45) -> Path:
    """Predicted (red, with scores) and true (green, dashed) boxes on the first validation images."""
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
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    h, w = images.shape[-2:]
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols * w / max(h, w) + 1, 4 * rows * h / max(h, w) + 1),
                             squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        t = targets[targets[:, 0] == i].cpu()
        draw_boxes(ax, t[:, 2:6].numpy(), t[:, 1].long().tolist(), class_names, "lime", dashed=True)
        d = dets[i]
        draw_boxes(ax, d.boxes.cpu().numpy(), d.labels.cpu().tolist(), class_names, "red", d.scores.cpu().tolist())
    return _save(fig, out)
