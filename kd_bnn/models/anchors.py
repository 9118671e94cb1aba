"""Anchor boxes by k-means on box shapes with the IoU distance of YOLOv2.

Redmon & Farhadi, "YOLO9000: Better, Faster, Stronger" (CVPR 2017), Sec. 2 "Dimension
Clusters": k-means on ground-truth (w, h) with ``d(box, centroid) = 1 - IoU(box, centroid)``,
where both shapes are placed at the same centre, so the anchors do not depend on box size the
way Euclidean k-means does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Nominal KITTI image size (height, width); the frames vary by a few pixels around it.
KITTI_IMAGE_SIZE = (375, 1242)


def shape_iou(wh: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """IoU of box shapes placed at a common centre: (N, 2) x (K, 2) -> (N, K)."""
    wh = np.asarray(wh, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    inter = np.minimum(wh[:, None, 0], centroids[None, :, 0]) * np.minimum(wh[:, None, 1], centroids[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (centroids[:, 0] * centroids[:, 1])[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def mean_best_iou(wh: np.ndarray, anchors: np.ndarray) -> float:
    """Average over boxes of the IoU with their closest anchor (the YOLOv2 paper's "Avg IOU")."""
    return float(shape_iou(wh, anchors).max(axis=1).mean())


def kmeans_anchors(wh: np.ndarray, k: int, seed: int = 0, iters: int = 300,
                   reduce: str = "mean") -> np.ndarray:
    """Cluster box shapes into `k` anchors with the distance ``1 - IoU`` (YOLOv2, Sec. 2).

    Initialisation is k-means++ under the same distance; an empty cluster is re-seeded with the
    box that is farthest from its centroid. Iterates until the assignment no longer changes.

    Args:
        wh: (N, 2) positive box widths and heights (any unit; the anchors come out in it).
        k: number of anchors.
        seed: random seed of the initialisation.
        iters: maximum number of assignment/update rounds.
        reduce: "mean" (as the paper) or "median" to update the centroids.

    Returns:
        (k, 2) anchors (w, h) sorted by area, smallest first.
    """
    wh = np.asarray(wh, dtype=np.float64)
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"wh: expected an (N, 2) array of widths and heights, found shape {wh.shape}")
    wh = wh[(wh[:, 0] > 0) & (wh[:, 1] > 0)]
    if k < 1:
        raise ValueError(f"k: expected a positive number of anchors, found {k}")
    if len(wh) < k:
        raise ValueError(f"k-means needs at least k={k} boxes with positive size, found {len(wh)}")
    if reduce not in ("mean", "median"):
        raise ValueError(f"reduce: expected 'mean' or 'median', found {reduce!r}")
    rng = np.random.default_rng(seed)
    # k-means++ with the IoU distance.
    centroids = [wh[rng.integers(len(wh))]]
    for _ in range(1, k):
        d = 1.0 - shape_iou(wh, np.asarray(centroids)).max(axis=1)
        p = d ** 2
        total = p.sum()
        idx = rng.integers(len(wh)) if total <= 0 else rng.choice(len(wh), p=p / total)
        centroids.append(wh[idx])
    centroids = np.asarray(centroids, dtype=np.float64)
    fn = np.mean if reduce == "mean" else np.median
    assign = None
    for _ in range(iters):
        iou = shape_iou(wh, centroids)
        new_assign = iou.argmax(axis=1)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        best = iou[np.arange(len(wh)), assign]
        for j in range(k):
            members = wh[assign == j]
            if len(members):
                centroids[j] = fn(members, axis=0)
            else:  # re-seed with the worst-fitted box
                far = int(best.argmin())
                centroids[j] = wh[far]
                best[far] = 1.0
    order = np.argsort(centroids[:, 0] * centroids[:, 1])
    return centroids[order]


def letterbox_scale(image_size: tuple[int, int], input_size: tuple[int, int]) -> float:
    """Scale factor of a letterbox resize from image (h, w) to input (h, w): keeps aspect ratio."""
    return min(input_size[0] / image_size[0], input_size[1] / image_size[1])


def kitti_box_sizes(label_dir: str | os.PathLike, classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                    merge: dict[str, str] | None = None) -> np.ndarray:
    """(N, 2) widths and heights in image pixels of every box of `classes` in a label_2 folder.

    `merge` maps other KITTI types onto a class first (e.g. ``{"Van": "Car"}``).
    """
    from kd_bnn.data.kitti import read_label_file

    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder {label_dir} does not exist")
    files = sorted(label_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"label folder {label_dir} holds no .txt label files")
    merge = merge or {}
    keep = set(classes)
    out = []
    for f in files:
        lab = read_label_file(f)
        if not len(lab):
            continue
        types = np.asarray([merge.get(t, t) for t in lab.types], dtype=object)
        sel = np.isin(types, list(keep))
        b = lab.boxes[sel]
        out.append(np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1))
    if not out:
        raise ValueError(f"no boxes of classes {list(classes)} in {label_dir}")
    return np.concatenate(out, axis=0)


def anchors_from_kitti(label_dir: str | os.PathLike, classes: Sequence[str] = ("Car", "Pedestrian", "Cyclist"),
                       input_size: tuple[int, int] = (384, 1248), k: int = 5, seed: int = 0,
                       image_size: tuple[int, int] = KITTI_IMAGE_SIZE, merge: dict[str, str] | None = None,
                       iters: int = 300) -> tuple[np.ndarray, float]:
    """k-means anchors in input pixels for KITTI boxes letterboxed to `input_size` (h, w).

    Box sizes are scaled by the letterbox factor of the nominal KITTI frame (`image_size`, h, w)
    to the network input, so the anchors match what the network sees.

    Returns:
        (anchors (k, 2) w, h in input pixels sorted by area, mean best IoU of the boxes).
    """
    wh = kitti_box_sizes(label_dir, classes, merge) * letterbox_scale(image_size, input_size)
    anchors = kmeans_anchors(wh, k, seed=seed, iters=iters)
    return anchors, mean_best_iou(wh, anchors)


#: KITTI Car/Pedestrian/Cyclist anchors (w, h) in input pixels for a 384x1248 input, from
#: `anchors_from_kitti` on all 7481 training labels (seed 0); mean IoU 0.630 (k=5), 0.658 (k=6).
KITTI_ANCHORS_384x1248 = {
    5: ((35.93, 34.82), (87.15, 49.70), (66.66, 148.49), (166.35, 91.04), (287.06, 171.86)),
    6: ((36.25, 27.98), (31.08, 79.39), (83.07, 47.96), (80.33, 163.64), (161.74, 87.10), (288.53, 169.25)),
}


def kitti_default_anchors(input_size: tuple[int, int] = (384, 1248), k: int = 5) -> np.ndarray:
    """The precomputed KITTI anchors (k = 5 or 6) in pixels, letterbox-rescaled to `input_size` (h, w)."""
    if k not in KITTI_ANCHORS_384x1248:
        raise ValueError(f"precomputed KITTI anchors exist for k in {sorted(KITTI_ANCHORS_384x1248)}, found k={k}; "
                         "compute others with anchors_from_kitti or tools/anchors.py")
    base = np.asarray(KITTI_ANCHORS_384x1248[k], dtype=np.float64)
    ratio = letterbox_scale(KITTI_IMAGE_SIZE, input_size) / letterbox_scale(KITTI_IMAGE_SIZE, (384, 1248))
    return base * ratio
