"""Side-by-side check of `kd_bnn.eval.kitti` against the official devkit: numbers and time.

Detections are synthesized from real ground truth (jitter, score noise, duplicates, class
confusion, misses, false positives of all sizes, some inside DontCare regions, tied scores) and
written with our result writer; both evaluators then read the same folder.

The devkit binary is optional. Expected interface (a 2D-only build of the devkit's
``evaluate_object.cpp`` with plots/boost removed and a split file instead of the fixed image
count): ``BINARY GT_DIR RESULT_DIR SPLIT_FILE`` printing lines
``AP_R11 <Class> easy moderate hard`` and ``AP_R40 <Class> easy moderate hard``
(percent; R40 = sum of precisions 1..40 / 40, R11 = sum of precisions 0, 4, ..., 40 / 11).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kd_bnn.data.kitti import DEFAULT_CLASSES, DIFFICULTIES, FrameLabels, read_split
from kd_bnn.eval.kitti import (
    KittiEvalResult,
    evaluate_kitti_dirs,
    format_result_lines,
    read_kitti_dir,
)
from kd_bnn.io import atomic_write_text

_SOURCE_TYPES = {  # ground-truth type -> detected class name (None: not detected)
    "Car": "Car", "Van": "Car", "Truck": "Car", "Pedestrian": "Pedestrian",
    "Person_sitting": "Pedestrian", "Cyclist": "Cyclist",
}


def synthetic_detections(gt: FrameLabels, rng: np.random.Generator, image_size=(375, 1242),
                         classes: Sequence[str] = DEFAULT_CLASSES, tie_scores: bool = False,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plausible detector output for one frame: (boxes x1y1x2y2, scores, class indices)."""
    h_img, w_img = image_size
    boxes, scores, labels = [], [], []
    cidx = {c: i for i, c in enumerate(classes)}
    dc_boxes = gt.boxes[gt.types == "DontCare"] if len(gt) else np.zeros((0, 4))
    for k in range(len(gt)):
        t = str(gt.types[k])
        name = _SOURCE_TYPES.get(t)
        if name is None or name not in cidx:
            continue
        if t in ("Van", "Truck", "Person_sitting") and rng.random() < 0.5:
            continue
        if rng.random() < 0.12:  # missed
            continue
        b = gt.boxes[k]
        bw, bh = b[2] - b[0], b[3] - b[1]
        n_copies = 1 + (rng.random() < 0.15) + (rng.random() < 0.05)
        for copy in range(n_copies):
            sig = rng.choice([0.02, 0.06, 0.12, 0.25], p=[0.4, 0.35, 0.2, 0.05])
            jit = rng.normal(0, sig, 4) * np.array([bw, bh, bw, bh])
            nb = b + jit
            nb = np.array([min(nb[0], nb[2]), min(nb[1], nb[3]), max(nb[0], nb[2]), max(nb[1], nb[3])])
            q = 1.0 - min(1.0, sig * 3)
            s = np.clip(0.35 + 0.5 * q + rng.normal(0, 0.18) - 0.2 * copy, 0.001, 0.999)
            lab = name
            if name in ("Pedestrian", "Cyclist") and rng.random() < 0.1:
                other = "Cyclist" if name == "Pedestrian" else "Pedestrian"
                lab = other if other in cidx else name
            boxes.append(nb)
            scores.append(s)
            labels.append(cidx[lab])
    n_fp = rng.poisson(3.0)
    for _ in range(n_fp):
        lab = int(rng.integers(len(classes)))
        if len(dc_boxes) and rng.random() < 0.3:  # inside a DontCare region
            d = dc_boxes[rng.integers(len(dc_boxes))]
            x1 = rng.uniform(d[0], max(d[0], d[2] - 5))
            y1 = rng.uniform(d[1], max(d[1], d[3] - 5))
            nb = np.array([x1, y1, rng.uniform(x1 + 1, max(x1 + 2, d[2])),
                           rng.uniform(y1 + 1, max(y1 + 2, d[3]))])
        else:
            hh = float(rng.choice([rng.uniform(10, 45), rng.uniform(20, 200), 25.0, 40.0, 39.99]))
            ww = hh * (2.0 if classes[lab] == "Car" else 0.5) * rng.uniform(0.7, 1.3)
            x1 = rng.uniform(-20, w_img)
            y1 = rng.uniform(100, h_img - 10)
            nb = np.array([x1, y1, x1 + ww, y1 + hh])
        boxes.append(nb)
        scores.append(float(rng.uniform(0.001, 0.8)))
        labels.append(lab)
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    boxes = np.asarray(boxes)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w_img - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h_img - 1)
    scores = np.asarray(scores)
    if tie_scores:
        scores = np.round(scores, 2)
    order = rng.permutation(len(boxes))
    return boxes[order], scores[order], np.asarray(labels, dtype=np.int64)[order]


def write_synthetic_results(gt_frames: dict[str, FrameLabels], out_dir: str | os.PathLike, seed: int,
                            classes: Sequence[str] = DEFAULT_CLASSES) -> Path:
    """Write one synthetic result file per frame of `gt_frames` into `out_dir`."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tie = seed % 2 == 1
    for fid, fl in gt_frames.items():
        b, s, lab = synthetic_detections(fl, rng, classes=classes, tie_scores=tie)
        atomic_write_text(out / f"{fid}.txt", format_result_lines(b, s, lab, classes))
    return out


def parse_devkit_output(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """``AP_R11 Car e m h`` / ``AP_R40 ...`` lines -> {class: {"R11": {...}, "R40": {...}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for line in text.splitlines():
        p = line.split()
        if len(p) == 5 and p[0] in ("AP_R11", "AP_R40"):
            out.setdefault(p[1], {})[p[0][3:]] = dict(zip(DIFFICULTIES, map(float, p[2:])))
    return out


def parse_devkit_precision(text: str) -> dict[str, np.ndarray]:
    """Optional ``PREC <Class> <difficulty 0-2> p0 ... p40`` lines -> {class: (3, 41)}."""
    out: dict[str, np.ndarray] = {}
    for line in text.splitlines():
        p = line.split()
        if len(p) == 44 and p[0] == "PREC":
            out.setdefault(p[1], np.full((3, 41), np.nan))[int(p[2])] = np.array(p[3:], dtype=float)
    return out


def run_devkit(binary: str | os.PathLike, gt_dir, pred_dir, split_file) -> tuple[dict, float]:
    """Run the devkit binary once; returns (AP dict, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(binary), str(gt_dir), str(pred_dir), str(split_file)],
                          capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"devkit {binary} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    res = parse_devkit_output(proc.stdout)
    prec = parse_devkit_precision(proc.stdout)
    if prec:
        res["_precision"] = prec
    return res, dt


@dataclass
class BenchRow:
    seed: int
    ours_s: float
    devkit_s: float | None
    max_abs_diff: float | None
    ours: KittiEvalResult
    devkit: dict | None = field(default=None)
    max_precision_diff: float | None = None  # on the 41-point curves, when the devkit prints them
    ours_min_s: float | None = None
    devkit_min_s: float | None = None
    same_digits: bool | None = None


def max_precision_difference(ours: KittiEvalResult, devkit: dict) -> float | None:
    """Largest |ours - devkit| of the interpolated precision curves (None when not printed)."""
    prec = devkit.get("_precision")
    if not prec:
        return None
    worst = 0.0
    for c, p in prec.items():
        if c in ours.precision:
            worst = max(worst, float(np.nanmax(np.abs(ours.precision[c] - p))))
    return worst


def same_printed_digits(ours: KittiEvalResult, devkit: dict) -> bool:
    """Whether every AP printed with ``%f`` (6 decimals) equals the devkit's printed value."""
    for c, kinds in ours.ap.items():
        if c not in devkit:
            continue
        for k in ("R11", "R40"):
            for d in DIFFICULTIES:
                if float(f"{kinds[k][d]:.6f}") != devkit[c][k][d]:
                    return False
    return True


def max_ap_difference(ours: KittiEvalResult, devkit: dict) -> float:
    """Largest |ours - devkit| over classes, difficulties and R11/R40 (inf if one is missing)."""
    worst = 0.0
    for c, kinds in ours.ap.items():
        if c not in devkit:
            if ours.evaluated[c]:
                return float("inf")
            continue
        for k in ("R11", "R40"):
            for d in DIFFICULTIES:
                worst = max(worst, abs(kinds[k][d] - devkit[c][k][d]))
    return worst


def benchmark(gt_dir, split_file, seeds: Sequence[int] = (0, 1, 2), devkit: str | None = None,
              repeats: int = 3, work_dir: str | os.PathLike | None = None) -> list[BenchRow]:
    """For each seed: synthesize results, time ours and (if given) the devkit, compare AP.

    Times are the median (and min) of `repeats` alternating runs, file reading included for both.
    """
    ids = read_split(split_file)
    gflat, _ = read_kitti_dir(gt_dir, ids, results=False)
    gt_frames = gflat.to_frames()
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for seed in seeds:
            pred = Path(tmp) / f"seed{seed}"
            write_synthetic_results(gt_frames, pred, seed)
            t_ours, t_dev, res, dres = [], [], None, None
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = evaluate_kitti_dirs(gt_dir, pred, ids)
                t_ours.append(time.perf_counter() - t0)
                if devkit:
                    dres, dt = run_devkit(devkit, gt_dir, pred, split_file)
                    t_dev.append(dt)
            rows.append(BenchRow(
                seed, float(np.median(t_ours)), float(np.median(t_dev)) if devkit else None,
                max_ap_difference(res, dres) if devkit else None, res, dres,
                max_precision_difference(res, dres) if devkit else None,
                float(np.min(t_ours)), float(np.min(t_dev)) if devkit else None,
                same_printed_digits(res, dres) if devkit else None))
    return rows
