"""Synthetic KITTI: road scenes drawn with numpy/OpenCV, laid out like the official 2D benchmark.

Each frame is a camera view of a straight road (sky, horizon, a road in perspective with lane
markings, roadside buildings, trees and poles) with cars, vans, pedestrians and cyclists drawn as
distinct shapes. Their box heights, aspect ratios, lateral positions and per-frame counts are
sampled from distributions fitted to the real KITTI training labels (Geiger et al., CVPR 2012)
by `fit_kitti_statistics`; the fit is embedded below as `KITTI_STATS`, so generation needs no
KITTI files. The bottom edge of a box follows the ground plane seen by a pinhole camera, so
nearer objects are lower and larger (y2 = a + b * h). Objects are drawn far to near into an
instance-id mask, and `occluded` / `truncated` are computed from what was actually drawn.
Distant clusters are drawn but labelled `DontCare`, as in KITTI. Same seed -> identical bytes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np

from kd_bnn.data.kitti import FrameLabels, frame_ids_in, read_label_file, write_label_file
from kd_bnn.io import atomic_write_text

#: Classes drawn and labelled (KITTI names). `DontCare` regions come in addition.
SYNTH_CLASSES = ("Car", "Van", "Pedestrian", "Cyclist")
#: Levels at which the fitted distributions are stored (inverse CDF, linearly interpolated).
QUANTILE_LEVELS = (0.0, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55,
                   0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0)
#: Edges (pixels, at 375 px image height) of the box-height bins that condition aspect and position.
HEIGHT_BINS = (0.0, 25.0, 40.0, 70.0, 120.0, 1e9)
#: Focal length (px) of KITTI's left colour camera (P2 of most drives); with `CAMERA_HEIGHT` (m)
#: it turns the 2D box statistics into a consistent ground plane and plausible 3D fields.
FOCAL = 721.5377
CAMERA_HEIGHT = 1.65
REFERENCE_SIZE = (1242, 375)

# Occlusion levels from the fraction of an object's in-image pixels hidden by nearer ones.
OCCLUDED_PARTLY = 0.01  # hidden fraction above this -> 1 (partly occluded)
OCCLUDED_LARGELY = 0.5  # above this -> 2 (largely occluded)
MIN_VISIBLE = 0.1  # less visible than this: not labelled, its visible part becomes DontCare


# --------------------------------------------------------------------------------------------
# Fitting the statistics of real KITTI labels
# --------------------------------------------------------------------------------------------

def _quantiles(values: np.ndarray, decimals: int) -> list[float]:
    q = np.quantile(np.asarray(values, dtype=np.float64), QUANTILE_LEVELS)
    return [round(float(v), decimals) for v in q]


def fit_kitti_statistics(label_dir: str | os.PathLike, classes: tuple[str, ...] = SYNTH_CLASSES,
                         image_size: tuple[int, int] = REFERENCE_SIZE) -> dict:
    """Fit the box statistics the generator samples from, from a KITTI `label_2` folder.

    Per class: the distribution of the number of objects per frame, of the full (unclipped) box
    height, of the aspect ratio w/h and of the lateral offset X/H (3D centre x over 3D height,
    which equals (x_centre - cx) / h in the image) per height bin, and the ground line
    y2 = a + b * h (bottom edge against height, least squares on untruncated boxes). For
    `DontCare`: counts, heights, aspect ratios, x-centres (fraction of the width) and the ground
    line. Reference numbers (labelled-height quantiles, truncation and occlusion rates) are kept
    for comparison with generated data. Pixels are those of `image_size` (width, height).

    Raises:
        FileNotFoundError: `label_dir` is missing or has no label files.
        ValueError: fewer than 20 objects of a class (too few to fit).
    """
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise FileNotFoundError(f"KITTI label folder {label_dir} does not exist")
    ids = frame_ids_in(label_dir)
    if not ids:
        raise FileNotFoundError(f"no *.txt label files in {label_dir}")
    width, height = image_size
    wanted = (*classes, "DontCare")
    types, frame_of, nums = [], [], []
    for i, fid in enumerate(ids):
        lab = read_label_file(label_dir / f"{fid}.txt")
        types.extend(lab.types.tolist())
        frame_of.extend([i] * len(lab))
        nums.append(np.concatenate([lab.truncated[:, None], lab.occluded[:, None], lab.boxes,
                                    lab.dims, lab.loc], axis=1))
    all_types = np.asarray(types, dtype=object)
    all_frames = np.asarray(frame_of, dtype=np.int64)
    all_nums = np.concatenate(nums) if nums else np.zeros((0, 12))
    counts = {c: np.bincount(all_frames[all_types == c], minlength=len(ids)) for c in wanted}
    data = {c: all_nums[all_types == c] for c in wanted}

    def columns(a: np.ndarray):
        x1, y1, x2, y2 = a[:, 2], a[:, 3], a[:, 4], a[:, 5]
        h, w = y2 - y1, x2 - x1
        clean = ((a[:, 0] <= 0) & (x1 > 0.5) & (y1 > 0.5) & (x2 < width - 1.5) & (y2 < height - 1.5)
                 & (h > 0) & (w > 0))
        return x1, y1, x2, y2, h, w, clean

    # Optical centre: x_centre - (X/H) * h over clean boxes of all classes.
    cx_samples = []
    for c in classes:
        a = data[c]
        x1, _, x2, _, h, _, clean = columns(a)
        lat = a[:, 9] / np.maximum(a[:, 6], 0.1)
        cx_samples.append(((x1 + x2) / 2 - lat * h)[clean])
    cx = float(np.median(np.concatenate(cx_samples))) if cx_samples else width / 2

    n_frames = len(ids)
    out: dict = {
        "source": "KITTI object training labels (label_2)", "num_frames": n_frames,
        "image_size": [int(width), int(height)], "cx": round(cx, 2),
        "quantile_levels": list(QUANTILE_LEVELS), "height_bins": list(HEIGHT_BINS), "classes": {},
    }
    for c in classes:
        a = data[c]
        if len(a) < 20:
            raise ValueError(f"{label_dir}: only {len(a)} objects of class {c!r}; need at least 20 to fit")
        x1, y1, x2, y2, h, w, clean = columns(a)
        dims_h, z = a[:, 6], a[:, 11]
        # Full height of clipped boxes from the 3D fields: h = k * f * H / Z (k fitted on clean ones).
        proj = FOCAL * (height / REFERENCE_SIZE[1]) * dims_h / np.maximum(z, 3.0)
        k = float(np.median(h[clean] / proj[clean]))
        h_full = np.where(clean, h, np.maximum(h, k * proj))
        lat = a[:, 9] / np.maximum(dims_h, 0.1)
        aspect = w / np.maximum(h, 1e-6)
        bins = np.clip(np.searchsorted(HEIGHT_BINS, h_full, side="right") - 1, 0, len(HEIGHT_BINS) - 2)
        aspect_q, lateral_q = [], []
        for b in range(len(HEIGHT_BINS) - 1):
            sel = bins == b
            sel_clean = sel & clean
            aspect_q.append(_quantiles(aspect[sel_clean] if sel_clean.sum() >= 20 else aspect[clean], 3))
            lateral_q.append(_quantiles(lat[sel] if sel.sum() >= 20 else lat, 3))
        design = np.stack([np.ones(clean.sum()), h[clean]], axis=1)
        coef, *_ = np.linalg.lstsq(design, y2[clean], rcond=None)
        resid = float(np.std(y2[clean] - design @ coef))
        hist = np.bincount(counts[c])
        out["classes"][c] = {
            "count_probs": [round(float(p), 5) for p in hist / n_frames],
            "mean_count": round(float(np.mean(counts[c])), 4),
            "height_q": _quantiles(h_full, 2),
            "aspect_q": aspect_q,
            "lateral_q": lateral_q,
            "ground": [round(float(coef[0]), 2), round(float(coef[1]), 4), round(resid, 2)],
            "dims_mean": [round(float(v), 3) for v in a[:, 6:9].mean(axis=0)],
            "dims_std": [round(float(v), 3) for v in a[:, 6:9].std(axis=0)],
            # Reference only (not sampled): what the labels themselves look like.
            "labelled_height_q": _quantiles(h, 2),
            "truncated_frac": round(float(np.mean(a[:, 0] > 0)), 4),
            "occluded_probs": [round(float(np.mean(a[:, 1] == v)), 4) for v in range(4)],
        }
    a = data["DontCare"]
    if len(a) >= 20:
        x1, y1, x2, y2, h, w, _ = columns(a)
        ok = (h > 0) & (w > 0)
        design = np.stack([np.ones(ok.sum()), h[ok]], axis=1)
        coef, *_ = np.linalg.lstsq(design, y2[ok], rcond=None)
        hist = np.bincount(counts["DontCare"])
        out["classes"]["DontCare"] = {
            "count_probs": [round(float(p), 5) for p in hist / n_frames],
            "mean_count": round(float(np.mean(counts["DontCare"])), 4),
            "height_q": _quantiles(h[ok], 2),
            "aspect_q": _quantiles(w[ok] / h[ok], 3),
            "xc_q": _quantiles(((x1 + x2) / 2 / width)[ok], 4),
            "ground": [round(float(coef[0]), 2), round(float(coef[1]), 4),
                       round(float(np.std(y2[ok] - design @ coef)), 2)],
        }
    return out


def statistics_source(stats: dict, name: str = "KITTI_STATS") -> str:
    """Python source of `stats` as an assignment, to embed a new fit in this module."""
    import pprint

    return f"{name}: dict = " + pprint.pformat(stats, width=100, compact=True, sort_dicts=False) + "\n"


# The fit of `fit_kitti_statistics` on the 7481 official training label files (regenerate with
# `python tools/make_synthetic.py --fit-stats ../shared/kitti/labels_trainval/label_2`).
# fmt: off
# BEGIN KITTI_STATS
KITTI_STATS: dict = {'source': 'KITTI object training labels (label_2)',
 'num_frames': 7481,
 'image_size': [1242, 375],
 'cx': 611.83,
 'quantile_levels': [0.0, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55,
                     0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0],
 'height_bins': [0.0, 25.0, 40.0, 70.0, 120.0, 1000000000.0],
 'classes': {'Car': {'count_probs': [0.10654, 0.18955, 0.14664, 0.11001, 0.10052, 0.08154, 0.06844,
                                     0.05654, 0.03917, 0.03008, 0.02272, 0.01631, 0.0127, 0.00802,
                                     0.00628, 0.00334, 0.00053, 0.0004, 0.00053, 0.00013],
                     'mean_count': 3.842,
                     'height_q': [12.67, 15.33, 17.15, 19.43, 22.46, 25.44, 27.88, 30.65, 33.4,
                                  36.4, 39.64, 43.11, 47.08, 51.58, 56.98, 63.56, 72.19, 83.52,
                                  99.06, 122.58, 162.6, 210.16, 298.48, 380.36, 534.07],
                     'aspect_q': [[0.942, 1.021, 1.04, 1.062, 1.122, 1.17, 1.216, 1.258, 1.284,
                                   1.325, 1.38, 1.436, 1.498, 1.564, 1.663, 1.721, 1.824, 1.939,
                                   2.066, 2.266, 2.542, 2.885, 3.011, 3.306, 3.714],
                                  [0.858, 0.988, 1.004, 1.012, 1.092, 1.116, 1.174, 1.218, 1.259,
                                   1.297, 1.353, 1.413, 1.471, 1.564, 1.682, 1.839, 2.038, 2.197,
                                   2.347, 2.498, 2.678, 2.959, 3.16, 3.398, 3.995],
                                  [0.748, 1.003, 1.004, 1.035, 1.096, 1.163, 1.219, 1.258, 1.306,
                                   1.353, 1.401, 1.458, 1.528, 1.636, 1.796, 1.974, 2.136, 2.272,
                                   2.405, 2.546, 2.695, 2.937, 3.093, 3.222, 3.569],
                                  [0.845, 1.047, 1.067, 1.129, 1.254, 1.316, 1.368, 1.406, 1.445,
                                   1.486, 1.53, 1.58, 1.649, 1.733, 1.861, 1.99, 2.111, 2.255,
                                   2.419, 2.562, 2.725, 2.951, 3.078, 3.22, 3.612],
                                  [0.97, 1.038, 1.049, 1.059, 1.239, 1.341, 1.4, 1.438, 1.474,
                                   1.504, 1.539, 1.569, 1.597, 1.622, 1.647, 1.679, 1.715, 1.752,
                                   1.796, 1.859, 1.948, 2.236, 2.494, 2.773, 3.091]],
                     'lateral_q': [[-29.053, -17.077, -15.606, -13.493, -11.733, -10.272, -8.779,
                                    -6.929, -5.624, -4.647, -3.704, -3.014, -2.521, -2.187, -1.518,
                                    -0.814, 0.247, 1.649, 2.366, 3.447, 5.967, 10.708, 13.994,
                                    17.74, 27.187],
                                   [-24.876, -17.663, -15.467, -13.739, -10.862, -8.344, -6.368,
                                    -5.313, -4.456, -3.746, -3.081, -2.568, -2.0, -1.024, -0.421,
                                    -0.033, 0.713, 1.653, 2.064, 2.886, 4.21, 9.145, 13.495, 15.183,
                                    27.374],
                                   [-17.357, -13.973, -12.026, -10.307, -7.811, -6.056, -5.25,
                                    -4.361, -3.796, -3.371, -2.808, -2.289, -1.704, -0.476, -0.015,
                                    0.458, 1.651, 1.938, 2.435, 3.037, 4.411, 7.904, 11.082, 13.879,
                                    17.299],
                                   [-10.487, -9.048, -8.233, -7.393, -6.102, -5.398, -4.79, -4.289,
                                    -3.904, -3.499, -3.063, -2.591, -2.233, -1.847, -0.338, 1.369,
                                    1.775, 1.988, 2.336, 2.824, 3.684, 5.495, 6.49, 7.683, 10.151],
                                   [-6.811, -5.752, -5.333, -4.854, -4.238, -3.829, -3.411, -3.007,
                                    -2.655, -2.368, -2.166, -2.012, -1.748, 0.061, 1.623, 1.789,
                                    1.914, 2.007, 2.148, 2.393, 2.736, 3.372, 4.186, 5.333,
                                    7.127]],
                     'ground': [177.13, 1.0262, 9.16],
                     'dims_mean': [1.526, 1.629, 3.884],
                     'dims_std': [0.137, 0.102, 0.426],
                     'labelled_height_q': [12.67, 15.33, 17.15, 19.43, 22.46, 25.44, 27.87, 30.64,
                                           33.4, 36.39, 39.61, 43.07, 46.99, 51.52, 56.93, 63.46,
                                           72.0, 83.21, 98.79, 121.79, 156.11, 179.7, 191.65,
                                           209.78, 334.53],
                     'truncated_frac': 0.1415,
                     'occluded_probs': [0.4682, 0.2847, 0.2148, 0.0323]},
             'Van': {'count_probs': [0.71327, 0.21254, 0.0528, 0.0147, 0.00615, 0.00053],
                     'mean_count': 0.3895,
                     'height_q': [16.89, 19.51, 21.4, 23.63, 27.1, 29.32, 31.96, 34.55, 37.41,
                                  40.47, 44.12, 48.46, 53.07, 58.54, 64.36, 71.38, 80.52, 95.06,
                                  114.0, 143.9, 196.45, 317.8, 447.48, 550.06, 736.45],
                     'aspect_q': [[0.73, 0.731, 0.745, 0.844, 0.844, 0.862, 0.873, 0.885, 0.945,
                                   0.99, 0.999, 1.002, 1.06, 1.121, 1.221, 1.315, 1.437, 1.709,
                                   1.766, 1.951, 2.208, 2.266, 2.679, 2.701, 2.727],
                                  [0.73, 0.73, 0.73, 0.743, 0.792, 0.84, 0.877, 0.911, 0.932, 0.953,
                                   1.006, 1.059, 1.146, 1.234, 1.302, 1.436, 1.541, 1.824, 1.972,
                                   2.086, 2.18, 2.525, 2.704, 2.784, 2.891],
                                  [0.807, 0.822, 0.878, 0.895, 0.945, 0.969, 0.996, 1.03, 1.049,
                                   1.072, 1.119, 1.179, 1.269, 1.352, 1.48, 1.654, 1.845, 2.013,
                                   2.197, 2.318, 2.515, 2.656, 2.738, 2.923, 2.973],
                                  [0.804, 0.862, 0.88, 0.899, 0.964, 0.995, 1.047, 1.071, 1.096,
                                   1.132, 1.168, 1.198, 1.256, 1.346, 1.412, 1.569, 1.728, 1.966,
                                   2.072, 2.116, 2.331, 2.663, 2.773, 2.934, 2.969],
                                  [0.871, 0.915, 0.969, 1.006, 1.069, 1.107, 1.131, 1.169, 1.205,
                                   1.227, 1.258, 1.281, 1.306, 1.334, 1.358, 1.403, 1.457, 1.528,
                                   1.665, 1.753, 1.855, 2.129, 2.377, 2.574, 2.993]],
                     'lateral_q': [[-10.866, -9.329, -9.224, -6.79, -6.454, -3.458, -2.432, -1.385,
                                    -0.363, -0.17, -0.117, -0.061, 0.059, 0.293, 0.566, 0.692,
                                    1.923, 2.441, 2.531, 6.674, 10.126, 10.521, 21.226, 21.627,
                                    21.891],
                                   [-17.941, -10.713, -10.418, -9.029, -6.447, -5.083, -4.415,
                                    -3.702, -2.749, -2.298, -2.094, -1.682, -1.124, -0.596, -0.03,
                                    0.405, 1.13, 1.461, 2.209, 3.327, 6.675, 10.51, 12.354, 19.3,
                                    20.858],
                                   [-15.859, -10.876, -9.428, -8.945, -6.596, -5.372, -4.421, -3.3,
                                    -2.503, -2.099, -1.937, -1.595, -0.934, 0.127, 1.116, 1.396,
                                    1.61, 2.852, 4.767, 6.135, 8.41, 10.667, 10.782, 12.342,
                                    13.944],
                                   [-9.363, -8.365, -6.885, -6.493, -5.299, -4.41, -3.772, -3.006,
                                    -2.281, -1.856, -1.773, -1.634, -1.38, -0.593, 0.617, 1.107,
                                    1.436, 1.584, 1.848, 3.354, 4.066, 6.253, 9.013, 9.729, 11.08],
                                   [-6.211, -5.209, -4.674, -4.529, -3.745, -2.936, -2.31, -2.019,
                                    -1.851, -1.755, -1.596, -1.488, -1.387, -1.077, 1.055, 1.16,
                                    1.273, 1.463, 1.543, 1.656, 2.486, 3.762, 4.28, 4.878, 5.988]],
                     'ground': [176.08, 0.7088, 12.83],
                     'dims_mean': [2.207, 1.902, 5.078],
                     'dims_std': [0.325, 0.173, 0.831],
                     'labelled_height_q': [16.89, 19.51, 21.4, 23.63, 27.1, 29.32, 31.94, 34.54,
                                           37.37, 40.47, 44.12, 48.46, 52.98, 58.38, 64.08, 70.84,
                                           80.02, 94.99, 113.5, 143.49, 191.62, 275.63, 365.01,
                                           374.0, 375.0],
                     'truncated_frac': 0.151,
                     'occluded_probs': [0.2656, 0.2996, 0.2423, 0.1925]},
             'Pedestrian': {'count_probs': [0.7622, 0.13715, 0.03542, 0.01791, 0.0127, 0.00668,
                                            0.00521, 0.00615, 0.00281, 0.00334, 0.00307, 0.00201,
                                            0.00201, 0.00094, 0.00053, 0.00053, 0.00067, 0.00027,
                                            0.0004],
                            'mean_count': 0.5998,
                            'height_q': [17.93, 22.77, 27.41, 32.72, 40.72, 46.57, 51.98, 57.03,
                                         62.48, 67.74, 73.9, 80.23, 87.96, 97.27, 107.58, 118.91,
                                         133.75, 146.84, 159.6, 171.79, 190.28, 227.38, 270.1,
                                         329.94, 471.79],
                            'aspect_q': [[0.247, 0.258, 0.262, 0.264, 0.285, 0.296, 0.31, 0.32,
                                          0.336, 0.343, 0.348, 0.36, 0.366, 0.374, 0.393, 0.401,
                                          0.408, 0.419, 0.436, 0.451, 0.464, 0.554, 0.603, 0.768,
                                          0.815],
                                         [0.181, 0.2, 0.219, 0.247, 0.274, 0.289, 0.308, 0.315,
                                          0.333, 0.343, 0.352, 0.357, 0.371, 0.381, 0.388, 0.397,
                                          0.408, 0.419, 0.434, 0.453, 0.475, 0.516, 0.573, 0.625,
                                          0.769],
                                         [0.15, 0.204, 0.238, 0.256, 0.279, 0.297, 0.308, 0.317,
                                          0.327, 0.337, 0.344, 0.351, 0.361, 0.367, 0.375, 0.383,
                                          0.392, 0.404, 0.419, 0.435, 0.456, 0.509, 0.543, 0.609,
                                          0.738],
                                         [0.194, 0.228, 0.253, 0.278, 0.3, 0.315, 0.325, 0.335,
                                          0.344, 0.353, 0.36, 0.368, 0.376, 0.387, 0.397, 0.407,
                                          0.418, 0.429, 0.44, 0.463, 0.489, 0.552, 0.602, 0.677,
                                          0.935],
                                         [0.215, 0.257, 0.284, 0.3, 0.319, 0.332, 0.349, 0.36, 0.37,
                                          0.379, 0.389, 0.399, 0.408, 0.42, 0.435, 0.448, 0.462,
                                          0.475, 0.49, 0.508, 0.529, 0.568, 0.608, 0.642, 0.851]],
                            'lateral_q': [[-7.211, -6.997, -6.68, -6.326, -6.011, -5.594, -5.365,
                                           -4.626, -1.791, -1.674, -1.488, -1.302, -1.099, -0.983,
                                           -0.756, -0.532, -0.268, -0.011, 0.198, 0.55, 1.017,
                                           1.389, 1.544, 1.983, 3.448],
                                          [-14.059, -10.557, -9.228, -7.66, -6.447, -5.276, -4.722,
                                           -4.11, -2.493, -1.825, -1.014, -0.247, 0.421, 0.759,
                                           1.225, 1.738, 2.489, 2.698, 3.42, 5.112, 6.625, 10.635,
                                           10.701, 12.357, 16.9],
                                          [-14.063, -9.127, -8.66, -7.786, -6.587, -5.254, -4.068,
                                           -2.933, -2.163, -1.671, -1.277, -0.804, -0.104, 0.496,
                                           1.153, 1.657, 1.97, 2.35, 2.681, 3.204, 4.327, 6.081,
                                           7.969, 10.536, 14.188],
                                          [-8.278, -6.766, -6.184, -5.528, -4.217, -3.252, -2.74,
                                           -2.406, -2.042, -1.701, -1.279, -0.7, -0.179, 0.37,
                                           0.925, 1.386, 1.757, 2.168, 2.5, 2.887, 3.508, 4.98,
                                           5.771, 6.615, 7.974],
                                          [-4.613, -3.572, -3.157, -2.878, -2.519, -2.132, -1.841,
                                           -1.549, -1.077, -0.46, -0.033, 0.471, 0.84, 1.125, 1.373,
                                           1.528, 1.753, 2.0, 2.233, 2.515, 2.83, 3.319, 3.693,
                                           4.36, 5.283]],
                            'ground': [173.09, 0.8691, 11.26],
                            'dims_mean': [1.761, 0.66, 0.842],
                            'dims_std': [0.113, 0.143, 0.235],
                            'labelled_height_q': [13.52, 22.64, 27.34, 32.72, 40.71, 46.47, 51.97,
                                                  57.01, 62.46, 67.72, 73.89, 80.15, 87.89, 97.2,
                                                  107.56, 118.83, 133.75, 146.78, 159.43, 171.58,
                                                  188.26, 214.08, 229.72, 247.31, 294.48],
                            'truncated_frac': 0.0831,
                            'occluded_probs': [0.5944, 0.244, 0.1495, 0.012]},
             'Cyclist': {'count_probs': [0.84748, 0.10734, 0.02914, 0.01297, 0.00241, 0.00067],
                         'mean_count': 0.2175,
                         'height_q': [16.16, 18.21, 20.7, 23.85, 28.79, 32.42, 35.82, 39.06, 42.1,
                                      46.14, 50.33, 54.77, 60.05, 66.88, 69.99, 77.07, 85.51, 97.12,
                                      109.12, 126.79, 162.27, 217.59, 283.19, 382.62, 493.49],
                         'aspect_q': [[0.363, 0.379, 0.38, 0.382, 0.386, 0.389, 0.398, 0.408, 0.409,
                                       0.409, 0.41, 0.412, 0.415, 0.425, 0.436, 0.452, 0.614, 0.667,
                                       0.778, 0.891, 0.986, 1.031, 1.033, 1.035, 1.037],
                                      [0.304, 0.317, 0.326, 0.369, 0.406, 0.416, 0.419, 0.425, 0.44,
                                       0.453, 0.466, 0.516, 0.543, 0.569, 0.648, 0.708, 0.809,
                                       0.885, 0.975, 1.006, 1.047, 1.077, 1.269, 1.278, 1.284],
                                      [0.311, 0.328, 0.374, 0.391, 0.414, 0.432, 0.454, 0.469,
                                       0.493, 0.525, 0.543, 0.55, 0.586, 0.607, 0.625, 0.667, 0.738,
                                       0.824, 0.903, 1.002, 1.083, 1.16, 1.273, 1.305, 1.338],
                                      [0.33, 0.339, 0.382, 0.406, 0.436, 0.466, 0.49, 0.52, 0.542,
                                       0.555, 0.577, 0.604, 0.633, 0.657, 0.678, 0.708, 0.743,
                                       0.852, 0.919, 1.039, 1.13, 1.229, 1.369, 1.44, 1.507],
                                      [0.367, 0.422, 0.461, 0.481, 0.538, 0.55, 0.577, 0.615, 0.629,
                                       0.637, 0.663, 0.678, 0.696, 0.726, 0.752, 0.781, 0.822,
                                       0.878, 0.922, 0.955, 1.016, 1.148, 1.205, 1.256, 1.424]],
                         'lateral_q': [[-12.773, -12.761, -11.112, -10.701, -4.842, -4.278, -3.725,
                                        -2.443, -1.85, -1.77, -1.747, -1.688, -1.625, -1.601,
                                        -1.569, -1.293, -1.197, -0.753, 0.129, 3.63, 5.717, 5.83,
                                        5.893, 5.909, 5.915],
                                       [-15.514, -15.427, -12.814, -12.354, -10.124, -6.712, -4.461,
                                        -2.932, -1.995, -1.764, -1.508, -0.488, 0.92, 1.767, 2.43,
                                        2.505, 3.372, 3.89, 4.634, 5.483, 5.805, 6.238, 6.705, 9.22,
                                        10.387],
                                       [-15.383, -11.948, -9.684, -7.43, -4.922, -3.018, -2.302,
                                        -2.015, -1.666, -0.614, 0.178, 1.261, 1.649, 2.306, 2.959,
                                        3.894, 4.838, 5.256, 6.043, 6.099, 6.14, 6.858, 7.995,
                                        10.358, 13.148],
                                       [-7.86, -7.313, -4.936, -3.134, -2.376, -1.998, -1.771,
                                        -1.294, -0.542, 0.642, 1.326, 1.695, 2.183, 2.376, 2.635,
                                        3.018, 3.244, 3.774, 4.677, 4.949, 5.905, 6.414, 6.962,
                                        7.164, 8.145],
                                       [-3.749, -3.302, -3.188, -2.545, -1.978, -1.911, -1.798,
                                        -1.616, -1.469, -1.393, -1.221, -0.854, 0.513, 1.621, 1.695,
                                        1.785, 2.323, 2.427, 2.546, 2.893, 3.138, 3.67, 4.903,
                                        4.958, 5.448]],
                         'ground': [175.99, 0.8684, 11.86],
                         'dims_mean': [1.737, 0.597, 1.764],
                         'dims_std': [0.095, 0.124, 0.177],
                         'labelled_height_q': [16.16, 18.21, 20.7, 23.85, 28.79, 32.42, 35.82,
                                               39.06, 42.1, 46.14, 50.31, 54.77, 60.05, 66.88,
                                               69.99, 77.07, 85.3, 97.12, 108.54, 126.79, 162.27,
                                               197.83, 218.04, 245.86, 294.66],
                         'truncated_frac': 0.0824,
                         'occluded_probs': [0.6208, 0.1567, 0.0492, 0.1733]},
             'DontCare': {'count_probs': [0.28285, 0.30691, 0.20238, 0.10854, 0.0536, 0.02941,
                                          0.00896, 0.00521, 0.00107, 0.00027, 0.0004, 0.00013, 0.0,
                                          0.0, 0.0, 0.0, 0.00013, 0.00013],
                          'mean_count': 1.5098,
                          'height_q': [2.88, 6.29, 7.41, 8.7, 10.46, 11.5, 12.58, 13.88, 15.17,
                                       16.47, 17.49, 18.79, 19.83, 21.32, 22.93, 24.23, 26.08,
                                       28.17, 31.34, 35.34, 41.46, 57.02, 81.51, 146.92, 374.0],
                          'aspect_q': [0.082, 0.322, 0.393, 0.474, 0.638, 0.806, 0.954, 1.062, 1.16,
                                       1.271, 1.381, 1.499, 1.641, 1.801, 1.997, 2.214, 2.457,
                                       2.738, 3.099, 3.618, 4.453, 6.343, 8.966, 13.925, 38.015],
                          'xc_q': [0.0032, 0.0214, 0.0462, 0.1273, 0.2568, 0.3375, 0.3759, 0.4015,
                                   0.4199, 0.4342, 0.4459, 0.4573, 0.4695, 0.482, 0.4958, 0.5067,
                                   0.5214, 0.5478, 0.5794, 0.6187, 0.6896, 0.8115, 0.8833, 0.9458,
                                   0.9963],
                          'ground': [173.93, 0.9143, 16.79]}}}
# END KITTI_STATS
# fmt: on


# --------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------

_LEVELS = np.asarray(QUANTILE_LEVELS)


def _inv_cdf(q: list[float], u: float, log: bool = False) -> float:
    """Inverse CDF from stored quantiles (linear, or linear in log space for scale variables)."""
    qa = np.asarray(q, dtype=np.float64)
    if log:
        return float(np.exp(np.interp(u, _LEVELS, np.log(np.maximum(qa, 1e-6)))))
    return float(np.interp(u, _LEVELS, qa))


def _count(rng: np.random.Generator, probs: list[float]) -> int:
    p = np.asarray(probs, dtype=np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


def _height_bin(h_ref: float) -> int:
    return int(np.clip(np.searchsorted(HEIGHT_BINS, h_ref, side="right") - 1, 0, len(HEIGHT_BINS) - 2))


def _rgb(rng: np.random.Generator, base, jitter: float = 12.0) -> tuple[float, float, float]:
    c = np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0.0, jitter, 3), 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def _scaled(c, k: float) -> tuple[float, float, float]:
    return (float(min(c[0] * k, 255)), float(min(c[1] * k, 255)), float(min(c[2] * k, 255)))


CAR_COLOURS = ((225, 225, 225), (175, 178, 182), (120, 122, 126), (35, 35, 40), (60, 62, 68),
               (165, 30, 30), (35, 55, 130), (25, 35, 70), (40, 85, 55), (200, 190, 160),
               (215, 175, 40), (110, 30, 35))
VAN_COLOURS = ((230, 230, 230), (215, 215, 210), (170, 172, 176), (60, 62, 68), (40, 70, 140))
CLOTHES = ((30, 30, 35), (60, 60, 70), (35, 45, 90), (120, 30, 30), (200, 200, 200), (90, 70, 50),
           (40, 80, 50), (150, 120, 90), (180, 60, 40), (70, 90, 140), (220, 180, 60))
SKIN = ((230, 190, 160), (200, 150, 120), (150, 100, 70), (100, 65, 45))
BIKE = ((170, 20, 20), (20, 40, 140), (30, 30, 30), (180, 180, 185), (20, 110, 60))
TYRE = (22.0, 22.0, 24.0)


# --------------------------------------------------------------------------------------------
# Drawing in a box: normalised coordinates (u right, v down, both 0..1 over the box)
# --------------------------------------------------------------------------------------------

class _Canvas:
    """An RGB patch and a mask covering the pixels whose centres lie inside a float box."""

    def __init__(self, box: np.ndarray, width: int, height: int):
        x1, y1, x2, y2 = (float(v) for v in box)
        # Only the part inside the image is allocated; shapes outside it are clipped by OpenCV.
        self.ox, self.oy = max(math.ceil(x1), 0), max(math.ceil(y1), 0)
        pw = max(min(math.floor(x2), width - 1) - self.ox + 1, 0)
        ph = max(min(math.floor(y2), height - 1) - self.oy + 1, 0)
        self.rgb = np.zeros((ph, pw, 3), np.float32)
        self.mask = np.zeros((ph, pw), np.uint8)
        self.x0, self.y0 = x1 - self.ox, y1 - self.oy
        self.w, self.h = x2 - x1, y2 - y1
        self.flip = False

    def _pt(self, u: float, v: float) -> tuple[float, float]:
        if self.flip:
            u = 1.0 - u
        return self.x0 + u * self.w, self.y0 + v * self.h

    def poly(self, uv, colour) -> None:
        pts = np.round(np.asarray([self._pt(u, v) for u, v in uv]) * 16).astype(np.int32)
        cv2.fillPoly(self.rgb, [pts], colour, cv2.LINE_8, 4)
        cv2.fillPoly(self.mask, [pts], 255, cv2.LINE_8, 4)

    def rect(self, u1, v1, u2, v2, colour) -> None:
        self.poly(((u1, v1), (u2, v1), (u2, v2), (u1, v2)), colour)

    def ellipse(self, u, v, rx_px, ry_px, colour, thickness: int = -1) -> None:
        cx, cy = self._pt(u, v)
        c = (int(round(cx * 16)), int(round(cy * 16)))
        ax = (max(int(round(rx_px * 16)), 8), max(int(round(ry_px * 16)), 8))
        cv2.ellipse(self.rgb, c, ax, 0, 0, 360, colour, thickness, cv2.LINE_8, 4)
        cv2.ellipse(self.mask, c, ax, 0, 0, 360, 255, thickness, cv2.LINE_8, 4)

    def line(self, uv1, uv2, thick_px: float, colour) -> None:
        p1 = np.round(np.asarray(self._pt(*uv1)) * 16).astype(int)
        p2 = np.round(np.asarray(self._pt(*uv2)) * 16).astype(int)
        t = max(int(round(thick_px)), 1)
        cv2.line(self.rgb, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), colour, t, cv2.LINE_8, 4)
        cv2.line(self.mask, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), 255, t, cv2.LINE_8, 4)

    def shade(self, top: float, bottom: float) -> None:
        """Vertical light gradient (lit from above)."""
        g = np.linspace(top, bottom, self.rgb.shape[0], dtype=np.float32)
        self.rgb *= g[:, None, None]


def _glass(rng: np.random.Generator):
    return _rgb(rng, (45, 55, 65) if rng.random() < 0.6 else (120, 140, 160), 10)


def _draw_car(cv: _Canvas, rng: np.random.Generator, aspect: float) -> None:
    body = _rgb(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], 10)
    dark, glass = _scaled(body, 0.55), _glass(rng)
    if aspect < 1.45:  # seen from behind or in front
        front = rng.random() < 0.3
        cv.rect(0.05, 0.78, 0.25, 1.0, TYRE)
        cv.rect(0.75, 0.78, 0.95, 1.0, TYRE)
        cv.poly(((0.17, 0.0), (0.83, 0.0), (0.95, 0.42), (0.05, 0.42)), _scaled(body, 0.92))
        cv.poly(((0.22, 0.06), (0.78, 0.06), (0.88, 0.37), (0.12, 0.37)), glass)
        cv.poly(((0.03, 0.38), (0.97, 0.38), (1.0, 0.47), (1.0, 0.86), (0.0, 0.86), (0.0, 0.47)), body)
        cv.rect(0.0, 0.74, 1.0, 0.86, _scaled(body, 0.45) if rng.random() < 0.5 else (50.0, 50.0, 52.0))
        light = (235.0, 235.0, 205.0) if front else _rgb(rng, (200, 30, 25), 15)
        cv.rect(0.04, 0.48, 0.22, 0.6, light)
        cv.rect(0.78, 0.48, 0.96, 0.6, light)
        if front:
            cv.rect(0.3, 0.5, 0.7, 0.66, (40.0, 40.0, 42.0))
        cv.rect(0.4, 0.64, 0.6, 0.73, (225.0, 225.0, 220.0))
    else:  # side / three-quarter view
        cv.flip = bool(rng.random() < 0.5)
        r = 0.19 * cv.h
        ru = r / max(cv.w, 1e-6)
        cv.poly(((0.3, 0.0), (0.66, 0.0), (0.8, 0.4), (0.13, 0.4)), _scaled(body, 0.92))
        cv.poly(((0.32, 0.06), (0.47, 0.06), (0.47, 0.36), (0.19, 0.36)), glass)
        cv.poly(((0.5, 0.06), (0.64, 0.06), (0.75, 0.36), (0.5, 0.36)), glass)
        cv.poly(((0.0, 0.5), (0.03, 0.38), (0.97, 0.4), (1.0, 0.52), (1.0, 0.82), (0.0, 0.82)), body)
        cv.line((0.49, 0.42), (0.49, 0.76), max(cv.h * 0.02, 1), dark)
        cv.rect(0.0, 0.7, 1.0, 0.82, _scaled(body, 0.7))
        for uc in (0.04 + ru, 0.96 - ru):
            cv.ellipse(uc, 1.0 - r / max(cv.h, 1e-6), r * 1.02, r, TYRE)
            cv.ellipse(uc, 1.0 - r / max(cv.h, 1e-6), r * 0.5, r * 0.5, (150.0, 150.0, 155.0))
        cv.rect(0.955, 0.46, 1.0, 0.55, (235.0, 230.0, 200.0))
        cv.rect(0.0, 0.46, 0.04, 0.56, (190.0, 30.0, 25.0))
    cv.shade(1.1, 0.85)


def _draw_van(cv: _Canvas, rng: np.random.Generator, aspect: float) -> None:
    body = _rgb(rng, VAN_COLOURS[rng.integers(len(VAN_COLOURS))], 8)
    glass = _glass(rng)
    if aspect < 1.3:
        cv.rect(0.06, 0.84, 0.24, 1.0, TYRE)
        cv.rect(0.76, 0.84, 0.94, 1.0, TYRE)
        cv.poly(((0.03, 0.0), (0.97, 0.0), (1.0, 0.06), (1.0, 0.9), (0.0, 0.9), (0.0, 0.06)), body)
        cv.rect(0.08, 0.08, 0.47, 0.4, glass)
        cv.rect(0.53, 0.08, 0.92, 0.4, glass)
        cv.line((0.5, 0.05), (0.5, 0.82), max(cv.h * 0.015, 1), _scaled(body, 0.6))
        cv.rect(0.02, 0.5, 0.08, 0.74, (195.0, 30.0, 25.0))
        cv.rect(0.92, 0.5, 0.98, 0.74, (195.0, 30.0, 25.0))
        cv.rect(0.0, 0.8, 1.0, 0.9, (45.0, 45.0, 48.0))
    else:
        cv.flip = bool(rng.random() < 0.5)
        r = 0.15 * cv.h
        ru = r / max(cv.w, 1e-6)
        cv.poly(((0.0, 0.3), (0.1, 0.02), (0.16, 0.0), (1.0, 0.0), (1.0, 0.86), (0.0, 0.86)), body)
        cv.poly(((0.02, 0.3), (0.11, 0.06), (0.19, 0.06), (0.19, 0.38), (0.02, 0.38)), glass)
        if rng.random() < 0.6:
            cv.rect(0.24, 0.07, 0.95, 0.36, glass)
        cv.line((0.2, 0.05), (0.2, 0.8), max(cv.h * 0.015, 1), _scaled(body, 0.6))
        cv.rect(0.0, 0.76, 1.0, 0.86, _scaled(body, 0.55))
        for uc in (0.03 + ru, 0.97 - ru):
            cv.ellipse(uc, 1.0 - r / max(cv.h, 1e-6), r, r, TYRE)
            cv.ellipse(uc, 1.0 - r / max(cv.h, 1e-6), r * 0.5, r * 0.5, (150.0, 150.0, 155.0))
    cv.shade(1.08, 0.85)


def _draw_pedestrian(cv: _Canvas, rng: np.random.Generator, aspect: float) -> None:
    skin = _rgb(rng, SKIN[rng.integers(len(SKIN))], 8)
    hair = _rgb(rng, ((30, 25, 20), (90, 60, 30), (150, 140, 120))[rng.integers(3)], 8)
    shirt = _rgb(rng, CLOTHES[rng.integers(len(CLOTHES))], 15)
    pants = _rgb(rng, CLOTHES[rng.integers(len(CLOTHES))], 15)
    cv.flip = bool(rng.random() < 0.5)
    w_px, h_px = max(cv.w, 1e-6), max(cv.h, 1e-6)
    tw = min(0.25 * h_px / w_px, 0.9) / 2  # half torso width in u
    hw = min(0.1 * h_px / w_px, 0.45) / 2  # half leg width in u
    lean = float(rng.uniform(-0.06, 0.06))
    # Legs: feet at the box corners (stride or stance), hips under the torso.
    cv.poly(((0.5 - tw * 0.9, 0.5), (0.5, 0.5), (2 * hw, 0.96), (0.0, 0.96)), pants)
    cv.poly(((0.5, 0.5), (0.5 + tw * 0.9, 0.5), (1.0, 0.96), (1.0 - 2 * hw, 0.96)), _scaled(pants, 0.85))
    cv.rect(0.0, 0.95, 2.4 * hw, 1.0, (25.0, 25.0, 25.0))
    cv.rect(1.0 - 2.4 * hw, 0.95, 1.0, 1.0, (25.0, 25.0, 25.0))
    # Torso and arms.
    cv.poly(((0.5 - tw + lean, 0.15), (0.5 + tw + lean, 0.15), (0.5 + tw * 0.85, 0.56),
             (0.5 - tw * 0.85, 0.56)), shirt)
    swing = float(rng.uniform(0.0, 0.25))
    arm = max(0.055 * h_px, 1)
    cv.line((0.5 - tw + lean, 0.18), (max(0.5 - tw - swing, 0.04), 0.5), arm, _scaled(shirt, 0.85))
    cv.line((0.5 + tw + lean, 0.18), (min(0.5 + tw + swing, 0.96), 0.5), arm, _scaled(shirt, 0.85))
    # Head with hair.
    r = min(0.068 * h_px, 0.45 * w_px)
    cv.ellipse(0.5 + lean, 0.075, r * 0.9, 0.075 * h_px, skin)
    cv.poly(((0.5 + lean - r / w_px * 0.9, 0.06), (0.5 + lean - r / w_px * 0.5, 0.0),
             (0.5 + lean + r / w_px * 0.5, 0.0), (0.5 + lean + r / w_px * 0.9, 0.06)), hair)
    if rng.random() < 0.3:  # a bag or a jacket flap: clutter within the shape
        cv.rect(0.5 + tw * 0.3, 0.3, min(0.5 + tw * 1.1, 1.0), 0.5, _rgb(rng, (70, 50, 40), 20))
    cv.shade(1.05, 0.9)


def _draw_cyclist(cv: _Canvas, rng: np.random.Generator, aspect: float) -> None:
    skin = _rgb(rng, SKIN[rng.integers(len(SKIN))], 8)
    shirt = _rgb(rng, CLOTHES[rng.integers(len(CLOTHES))], 15)
    pants = _rgb(rng, CLOTHES[rng.integers(len(CLOTHES))], 15)
    frame = _rgb(rng, BIKE[rng.integers(len(BIKE))], 10)
    w_px, h_px = max(cv.w, 1e-6), max(cv.h, 1e-6)
    ring = max(0.03 * h_px, 1)
    head_r = 0.07 * h_px
    if aspect >= 0.62:  # side view
        cv.flip = bool(rng.random() < 0.5)
        r = min(0.2 * h_px, 0.25 * w_px)
        ru, rv = r / w_px, r / h_px
        rear, front = (ru, 1 - rv), (1 - ru, 1 - rv)
        seat, bar, crank = (0.4, 0.52), (0.78, 0.45), (0.5, 0.8)
        for c in (rear, front):
            cv.ellipse(c[0], c[1], r - ring / 2, r - ring / 2, TYRE, int(ring))
        for a, b in ((rear, seat), (seat, crank), (crank, rear), (seat, bar), (bar, front), (crank, bar)):
            cv.line(a, b, max(0.025 * h_px, 1), frame)
        shoulder = (0.6, 0.2)
        cv.line((0.42, 0.5), crank, max(0.07 * h_px, 1), pants)
        cv.line((0.42, 0.5), (0.6, 0.72), max(0.07 * h_px, 1), _scaled(pants, 0.8))
        cv.line((0.42, 0.5), shoulder, max(0.12 * h_px, 1), shirt)
        cv.line(shoulder, bar, max(0.045 * h_px, 1), _scaled(shirt, 0.85))
        cv.ellipse(0.66, 0.075, min(head_r, 0.2 * w_px), 0.075 * h_px, skin)
        cv.poly(((0.6, 0.06), (0.62, 0.0), (0.7, 0.0), (0.72, 0.06)),
                _rgb(rng, ((220, 40, 30), (30, 30, 30), (230, 230, 230))[rng.integers(3)], 10))
    else:  # from behind / in front: one thin wheel, handlebar across the box
        tw = min(0.26 * h_px / w_px, 0.9) / 2
        cv.ellipse(0.5, 0.8, max(0.035 * h_px, 0.8), 0.2 * h_px, TYRE)
        cv.line((0.5, 0.4), (0.5, 0.75), max(0.03 * h_px, 1), frame)
        cv.line((0.02, 0.4), (0.98, 0.4), max(0.03 * h_px, 1), frame)
        cv.poly(((0.5 - tw, 0.15), (0.5 + tw, 0.15), (0.5 + tw * 0.8, 0.52), (0.5 - tw * 0.8, 0.52)), shirt)
        cv.line((0.5 - tw, 0.18), (0.03, 0.4), max(0.045 * h_px, 1), _scaled(shirt, 0.85))
        cv.line((0.5 + tw, 0.18), (0.97, 0.4), max(0.045 * h_px, 1), _scaled(shirt, 0.85))
        cv.line((0.42, 0.5), (0.38, 0.82), max(0.07 * h_px, 1), pants)
        cv.line((0.58, 0.5), (0.62, 0.78), max(0.07 * h_px, 1), pants)
        cv.ellipse(0.5, 0.075, min(head_r, 0.45 * w_px), 0.075 * h_px, skin)
    cv.shade(1.05, 0.9)


def _draw_pole(cv: _Canvas, rng: np.random.Generator, aspect: float) -> None:
    cv.rect(0.0, 0.0, 1.0, 1.0, _rgb(rng, (120, 122, 118), 20))
    cv.shade(1.1, 0.8)


def _draw_tree(cv: _Canvas, rng: np.random.Generator, aspect: float) -> None:
    green = _rgb(rng, ((40, 70, 35), (55, 85, 40), (30, 50, 30), (75, 90, 45))[rng.integers(4)], 8)
    tw = 0.08
    cv.rect(0.5 - tw / 2, 0.45, 0.5 + tw / 2, 1.0, _rgb(rng, (75, 60, 45), 10))
    for _ in range(7):
        u, v = rng.uniform(0.25, 0.75), rng.uniform(0.18, 0.42)
        cv.ellipse(u, v, rng.uniform(0.18, 0.26) * cv.w, rng.uniform(0.14, 0.2) * cv.h,
                   _scaled(green, rng.uniform(0.75, 1.2)))
    cv.ellipse(0.5, 0.28, 0.5 * cv.w, 0.28 * cv.h, green)
    for _ in range(5):
        u, v = rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.5)
        cv.ellipse(u, v, rng.uniform(0.08, 0.16) * cv.w, rng.uniform(0.06, 0.1) * cv.h,
                   _scaled(green, rng.uniform(0.6, 1.3)))


_DRAW = {"Car": _draw_car, "Van": _draw_van, "Pedestrian": _draw_pedestrian, "Cyclist": _draw_cyclist,
         "pole": _draw_pole, "tree": _draw_tree}


# --------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------

@dataclass
class _Entity:
    kind: str  # a class name, "pole" or "tree"
    box: np.ndarray  # full (unclipped) x1, y1, x2, y2
    label: bool  # labelled object (False: DontCare member or clutter)
    group: int = -1  # DontCare group it belongs to
    uid: int = 0
    drawn: int = 0  # pixels inside the image when drawn (before nearer ones covered it)


@dataclass
class _Scene:
    width: int
    height: int
    s: float  # image scale w.r.t. the 375-px KITTI height
    f: float  # focal length (px)
    cx: float  # optical centre column
    yh: float  # horizon row
    vx: float  # vanishing column of the road
    road: tuple[float, float]  # lateral road edges (m)
    lanes: list[float]  # lateral positions of dashed lane lines (m)
    walk: float  # sidewalk width (m)

    def ground(self, x: float | np.ndarray, z: float | np.ndarray, up: float = 0.0):
        """Image point of the world point `up` metres above the ground at lateral x, depth z."""
        return self.vx + self.f * x / z, self.yh + self.f * (CAMERA_HEIGHT - up) / z


@dataclass
class SyntheticFrame:
    """One rendered frame.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        labels: the KITTI labels of the frame (objects first, then DontCare regions).
        instance_mask: (H, W) int32, the entity id owning each pixel (0 = background).
        label_ids: (N,) entity id of each label row (0 for DontCare rows).
        full_boxes: (N, 4) unclipped boxes of the label rows (clipped for DontCare rows).
        drawn_pixels: (N,) in-image pixels of each object when it was drawn (0 for DontCare).
        calib: the 3x4 camera matrix P2 used for the 3D fields.
    """

    image: np.ndarray
    labels: FrameLabels
    instance_mask: np.ndarray
    label_ids: np.ndarray
    full_boxes: np.ndarray
    drawn_pixels: np.ndarray
    calib: np.ndarray


def _make_scene(rng: np.random.Generator, width: int, height: int, stats: dict) -> _Scene:
    ref_w, ref_h = stats["image_size"]
    s = height / ref_h
    cx = stats["cx"] * width / ref_w
    a, _, std = stats["classes"]["Car"]["ground"]
    yh = a * s + rng.normal(0.0, 0.45 * std) * s  # camera pitch / road slope of this frame
    off = rng.normal(0.0, 0.4)
    n_left, n_right = int(rng.choice([0, 1, 1, 2])), int(rng.choice([0, 0, 1]))
    lane = rng.uniform(3.0, 3.7)
    left, right = -lane / 2 - n_left * lane + off, lane / 2 + n_right * lane + off
    lanes = [-lane / 2 - i * lane + off for i in range(n_left)] + \
            [lane / 2 + i * lane + off for i in range(n_right)]
    return _Scene(width, height, s, FOCAL * s, cx, yh, cx + rng.normal(0.0, 25.0) * s,
                  (left, right), lanes, float(rng.uniform(1.5, 3.5)))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    g = rng.uniform(-1, 1, (max(h // cell, 2) + 1, max(w // cell, 2) + 1)).astype(np.float32)
    return cv2.resize(g, (max(w, 1), max(h, 1)), interpolation=cv2.INTER_LINEAR)


def _textured(rng: np.random.Generator, h: int, w: int, cell: int, top, bottom, amp: float) -> np.ndarray:
    """(h, w, 3) float32 colour field: a vertical gradient from `top` to `bottom` modulated by
    low-frequency noise of relative amplitude `amp`, built on a coarse grid and upsampled
    bilinearly in one pass (exact for the gradient, which is linear)."""
    gh, gw = max(h // cell, 2) + 1, max(w // cell, 2) + 1
    rows = ((np.arange(gh) + 0.5) * h / gh - 0.5) / max(h - 1, 1)
    t = np.clip(rows, 0, 1).astype(np.float32)[:, None, None]
    base = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    grid = base * (1 + amp * rng.uniform(-1, 1, (gh, gw, 1)).astype(np.float32))
    return cv2.resize(grid, (max(w, 1), max(h, 1)), interpolation=cv2.INTER_LINEAR)


def _grey(rng: np.random.Generator, level: float, spread: float, tint: float = 4.0) -> tuple[float, float, float]:
    """A grey of random brightness with only a slight tint (asphalt, concrete)."""
    g = level + rng.uniform(-spread, spread)
    return _rgb(rng, (g, g, g), tint)


def _quad(scene: _Scene, x1: float, x2: float, z1: float, z2: float, up1: float = 0.0,
          up2: float = 0.0) -> np.ndarray:
    """A ground (or raised) quad from depth z1 to z2 between lateral x1 and x2, as cv2 points."""
    pts = [scene.ground(x1, z1, up1), scene.ground(x2, z1, up1), scene.ground(x2, z2, up2),
           scene.ground(x1, z2, up2)]
    return np.round(np.asarray(pts) * 16).astype(np.int32)


def _fill(img: np.ndarray, pts: np.ndarray, colour) -> None:
    cv2.fillPoly(img, [pts], colour, cv2.LINE_8, 4)


def _draw_background(img: np.ndarray, scene: _Scene, rng: np.random.Generator) -> list[_Entity]:
    """Sky, far tree line, terrain, road, sidewalks, markings, facades. Returns roadside clutter
    (poles and trees) to be drawn in depth order with the objects."""
    H, W = img.shape[:2]
    yh = scene.yh
    yi = int(np.clip(math.floor(yh), 0, H))
    # Sky: gradient from the zenith colour to a bright horizon, with soft clouds.
    zenith = _rgb(rng, ((95, 145, 215), (165, 185, 210), (200, 202, 208), (125, 165, 220))[rng.integers(4)], 8)
    horizon = _rgb(rng, (228, 232, 238), 6)
    # (Whole-image arithmetic uses contiguous same-shape operands or OpenCV: numpy broadcasting
    # over a trailing axis of 3 is an order of magnitude slower.)
    if yi > 0:
        img[:yi] = _textured(rng, yi, W, int(60 * scene.s) + 1, zenith, horizon, 0.07)
    # Terrain below the horizon (grass / dirt / pavement).
    terrain = _rgb(rng, ((85, 105, 55), (115, 110, 85), (125, 125, 120), (70, 90, 50))[rng.integers(4)], 8)
    if yi < H:
        img[yi:] = _textured(rng, H - yi, W, int(25 * scene.s) + 1, _scaled(terrain, 0.9), terrain, 0.18)
    # A distant tree line / hills along the horizon (a smoothed random profile per column).
    prof = np.abs(np.cumsum(rng.normal(0, 1.2, W))) % (40 * scene.s) + 4 * scene.s
    prof = cv2.GaussianBlur(prof.astype(np.float32)[None, :], (0, 0), 6 * scene.s).ravel()
    b0, b1 = int(np.clip(math.floor(yh - prof.max()), 0, H)), int(np.clip(math.ceil(yh + 1), 0, H))
    if b1 > b0:
        rows = np.arange(b0, b1, dtype=np.float32)[:, None]
        band = ((rows >= yh - prof[None, :]) & (rows <= yh + 1)).astype(np.float32)[..., None]
        colour = np.asarray(_rgb(rng, (55, 70, 50), 8), np.float32)
        tex = (1 + 0.15 * _smooth_noise(rng, b1 - b0, W, int(8 * scene.s) + 1))[..., None]
        img[b0:b1] = img[b0:b1] * (1 - band) + band * colour * tex
    # Aerial haze over the far scenery near the horizon.
    r0, r1 = int(np.clip(yh - 40 * scene.s, 0, H)), int(np.clip(yh + 40 * scene.s, 0, H))
    if r1 > r0:
        flat = img.reshape(H, W * 3)
        rows = np.arange(r0, r1, dtype=np.float32)[:, None]
        haze = 0.3 * np.exp(-np.abs(rows - np.float32(yh)) / np.float32(8.0 * scene.s))
        flat[r0:r1] *= 1 - haze
        flat[r0:r1] += haze * np.tile(np.asarray(_rgb(rng, (215, 220, 228), 6), np.float32), W)[None, :]
    # Facades along both sides (planes x = const between two depths), with windows.
    left, right = scene.road
    for side in (-1, 1):
        if rng.random() < 0.45:
            continue
        x = (left - scene.walk - rng.uniform(1, 6)) if side < 0 else (right + scene.walk + rng.uniform(1, 6))
        z = rng.uniform(12, 30)
        for _ in range(int(rng.integers(1, 4))):
            z2 = z + rng.uniform(8, 25)
            top = rng.uniform(5, 16)
            wall = _rgb(rng, ((170, 160, 145), (140, 95, 80), (200, 195, 180), (110, 110, 115))[rng.integers(4)], 8)
            facade = [scene.ground(x, z2), scene.ground(x, z), scene.ground(x, z, top), scene.ground(x, z2, top)]
            _fill(img, np.round(np.asarray(facade) * 16).astype(np.int32), wall)
            win = _scaled(wall, rng.uniform(0.3, 0.6))
            for fl in np.arange(1.2, top - 1.0, 3.0):
                for zz in np.arange(z + 1.0, z2 - 1.0, 3.0):
                    p = [scene.ground(x, zz, fl), scene.ground(x, zz + 1.4, fl),
                         scene.ground(x, zz + 1.4, fl + 1.5), scene.ground(x, zz, fl + 1.5)]
                    _fill(img, np.round(np.asarray(p) * 16).astype(np.int32), win)
            z = z2 + rng.uniform(0, 6)
    # Road, sidewalks and markings, from 120 m to below the bottom edge.
    z_near, z_far = 0.8 * scene.f * CAMERA_HEIGHT / max(H - yh, 1.0), 120.0
    _fill(img, _quad(scene, left - scene.walk, left, z_near, z_far), _grey(rng, 150, 15))
    _fill(img, _quad(scene, right, right + scene.walk, z_near, z_far), _grey(rng, 150, 15))
    if yi < H:
        road = np.zeros((H - yi, W), np.uint8)
        cv2.fillPoly(road, [_quad(scene, left, right, z_near, z_far) - np.array([0, yi * 16], np.int32)],
                     1, cv2.LINE_8, 4)
        asphalt = _grey(rng, 100, 15, 3)
        layer = _textured(rng, H - yi, W, int(14 * scene.s) + 1, _scaled(asphalt, 1.1), asphalt, 0.12)
        img[yi:] = cv2.copyTo(layer, road, img[yi:])
    line = _grey(rng, 232, 8, 2)
    for xe in (left + 0.25, right - 0.25):
        if rng.random() < 0.8:
            _fill(img, _quad(scene, xe - 0.07, xe + 0.07, z_near, z_far), line)
    period, dash = rng.uniform(9, 15), rng.uniform(2.5, 4.5)
    phase = rng.uniform(0, period)
    for xl in scene.lanes:
        for z0 in np.arange(z_near - phase, 80.0, period):
            if z0 + dash > z_near:
                _fill(img, _quad(scene, xl - 0.07, xl + 0.07, max(z0, z_near), z0 + dash), line)
    # Roadside clutter drawn in depth order with the objects (they occlude them).
    clutter: list[_Entity] = []
    for _ in range(int(rng.integers(0, 5))):
        side = -1 if rng.random() < 0.5 else 1
        x = (left - rng.uniform(0.3, scene.walk + 3)) if side < 0 else (right + rng.uniform(0.3, scene.walk + 3))
        z = rng.uniform(5, 70)
        tall, wide, kind = (rng.uniform(4, 9), rng.uniform(0.12, 0.25), "pole") if rng.random() < 0.5 else \
            (rng.uniform(5, 12), rng.uniform(3, 6), "tree")
        u, v = scene.ground(x, z)
        hp, wp = scene.f * tall / z, scene.f * wide / z
        clutter.append(_Entity(kind, np.array([u - wp / 2, v - hp, u + wp / 2, v]), False))
    return clutter


def _clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.array([max(box[0], 0.0), max(box[1], 0.0), min(box[2], width - 1.0), min(box[3], height - 1.0)])


def _area(box: np.ndarray) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _ground_noise(stats: dict, cls: str) -> float:
    """Per-object spread of the ground line left once the per-frame horizon jitter is removed."""
    frame_std = 0.45 * stats["classes"]["Car"]["ground"][2]
    return math.sqrt(max(stats["classes"][cls]["ground"][2] ** 2 - frame_std ** 2, 1.0))


def _sample_object(cls: str, scene: _Scene, rng: np.random.Generator, stats: dict) -> _Entity | None:
    """A labelled object whose height, shape, lateral offset and ground contact follow the fit."""
    st = stats["classes"][cls]
    s, W, H = scene.s, scene.width, scene.height
    a, b, _ = st["ground"]
    shift = scene.yh - stats["classes"]["Car"]["ground"][0] * s  # this frame's horizon offset
    noise = _ground_noise(stats, cls)
    for _ in range(10):
        h_ref = _inv_cdf(st["height_q"], rng.random(), log=True)
        k = _height_bin(h_ref)
        aspect = _inv_cdf(st["aspect_q"][k], rng.random())
        h = h_ref * s
        w = aspect * h
        # The lateral fit comes from labelled (hence visible) objects: redraw the position, not
        # the size, when the object falls out of view, so that large objects keep their share.
        for _ in range(10):
            xc = scene.cx + _inv_cdf(st["lateral_q"][k], rng.random()) * h
            y2 = a * s + shift + b * h + rng.normal(0.0, noise) * s
            box = np.array([xc - w / 2, y2 - h, xc + w / 2, y2])
            clipped = _clip_box(box, W, H)
            # Heavily truncated objects are kept as in KITTI (4-5 % of its cars are > 80 % out
            # of view), as long as a few pixels of them are in view.
            if min(clipped[2] - clipped[0], clipped[3] - clipped[1]) >= max(3.0 * s, 2.0):
                return _Entity(cls, box, True)
    return None


def _avoid_hiding(ents: list[_Entity], scene: _Scene, rng: np.random.Generator, stats: dict) -> None:
    """Move (laterally) labelled objects whose box nearer entities would almost entirely cover.

    With the camera 1.65 m up and cars 1.5 m tall, a car right behind another is invisible
    (both tops sit near the horizon); KITTI does not label such cars, so its per-frame counts are
    of visible objects. Redrawing the lateral offset of those (near to far, against a coarse
    raster of the boxes in front) keeps the sampled counts and heights."""
    W, H = scene.width, scene.height
    cell = 4
    occ = np.zeros(((H + cell - 1) // cell, (W + cell - 1) // cell), np.uint8)

    def cells(box):
        c = _clip_box(box, W, H)
        return (int(c[1]) // cell, int(math.ceil(c[3])) // cell + 1, int(c[0]) // cell, int(math.ceil(c[2])) // cell + 1)

    def covered(box) -> float:
        r0, r1, c0, c1 = cells(box)
        patch = occ[r0:r1, c0:c1]
        return float(patch.mean()) if patch.size else 1.0

    for e in sorted(ents, key=lambda e: -float(e.box[3])):  # near to far
        if e.label and covered(e.box) > 0.8:
            x1, y1, x2, y2 = e.box
            h, w = y2 - y1, x2 - x1
            lat_q = stats["classes"][e.kind]["lateral_q"][_height_bin(h / scene.s)]
            best, best_cov = e.box, covered(e.box)
            for _ in range(6):
                xc = scene.cx + _inv_cdf(lat_q, rng.random()) * h
                box = np.array([xc - w / 2, y1, xc + w / 2, y2])
                clipped = _clip_box(box, W, H)
                if min(clipped[2] - clipped[0], clipped[3] - clipped[1]) < max(3.0 * scene.s, 2.0):
                    continue
                cov = covered(box)
                if cov < best_cov:
                    best, best_cov = box, cov
                if cov <= 0.5:
                    break
            e.box = best
        r0, r1, c0, c1 = cells(e.box)
        occ[r0:r1, c0:c1] = 1


def _sample_dontcare(scene: _Scene, rng: np.random.Generator, stats: dict, group: int) -> list[_Entity]:
    """A distant cluster (a row of small cars, sometimes people) that is drawn but not labelled."""
    st = stats["classes"]["DontCare"]
    s, W, H = scene.s, scene.width, scene.height
    a, b, _ = st["ground"]
    shift = scene.yh - stats["classes"]["Car"]["ground"][0] * s
    # Heights from the lower 90 % of KITTI's DontCare boxes: distant clusters, not the rare
    # large regions (reflections, crowds) the top decile holds.
    h = _inv_cdf(st["height_q"], 0.9 * rng.random(), log=True) * s
    width = min(_inv_cdf(st["aspect_q"], rng.random(), log=True), 8.0) * h
    xc = _inv_cdf(st["xc_q"], rng.random()) * W
    y2 = a * s + shift + b * h + rng.normal(0.0, _ground_noise(stats, "DontCare")) * s
    n = int(np.clip(round(width / (1.5 * h)), 1, 6))
    slot = width / n
    members = []
    for j in range(n):
        cls = "Car" if rng.random() < 0.8 else "Pedestrian"
        hm = h * (1.0 if j == 0 else rng.uniform(0.75, 1.0))
        wm = min(hm * (rng.uniform(1.1, 2.2) if cls == "Car" else rng.uniform(0.3, 0.45)), 1.3 * slot)
        um = xc - width / 2 + (j + 0.5) * slot + rng.uniform(-0.15, 0.15) * slot
        bottom = y2 - rng.uniform(0.0, 0.3) * (h - hm)
        box = np.array([um - wm / 2, bottom - hm, um + wm / 2, bottom])
        if _area(_clip_box(box, W, H)) > 0:
            members.append(_Entity(cls, box, False, group))
    return members


def _alpha_from_aspect(aspect: float, dims: np.ndarray, rng: np.random.Generator) -> float:
    """Observation angle whose projected footprint w|cos| + l|sin| has the box's width (in metres
    at the object's depth, aspect * height); heading away or towards the camera at random."""
    hm, wm, lm = dims
    radius, delta = math.hypot(wm, lm), math.atan2(lm, wm)
    phi = max(delta - math.acos(min(aspect * hm / radius, 1.0)), 0.0)
    base = -math.pi / 2 if rng.random() < 0.6 else math.pi / 2
    alpha = base + (phi if rng.random() < 0.5 else -phi)
    return (alpha + math.pi) % (2 * math.pi) - math.pi


def _shadows(img: np.ndarray, scene: _Scene, rng: np.random.Generator, ents: list[_Entity]) -> None:
    """Soft ground shadows: patches from trees and buildings, dark ellipses under road users.
    Drawn on a half-resolution map, blurred and upsampled."""
    H, W = img.shape[:2]
    hs, ws = (H + 1) // 2, (W + 1) // 2
    shade = np.ones((hs, ws), np.float32)
    q = 8  # 1/16-pixel fixed point at half resolution
    for _ in range(int(rng.integers(0, 4))):
        x = rng.uniform(scene.road[0] - 3, scene.road[1] + 3)
        z = rng.uniform(7, 40)
        u, v = scene.ground(x, z)
        ax = (int(scene.f * rng.uniform(0.8, 2.5) / z * q) + 8,
              int(scene.f * CAMERA_HEIGHT * rng.uniform(0.8, 2.5) / z ** 2 * q) + 8)
        cv2.ellipse(shade, (int(u * q), int(v * q)), ax, float(rng.uniform(-20, 20)), 0, 360,
                    float(rng.uniform(0.6, 0.85)), -1, cv2.LINE_8, 4)
    for e in ents:
        if e.kind in ("Car", "Van", "Pedestrian", "Cyclist"):
            x1, y1, x2, y2 = e.box
            h = y2 - y1
            c = (int((x1 + x2) / 2 * q), int((y2 - 0.01 * h) * q))
            ax = (int((x2 - x1) * 0.58 * q) + 8, int(h * 0.06 * q) + 8)
            cv2.ellipse(shade, c, ax, 0, 0, 360, 0.45, -1, cv2.LINE_8, 4)
    shade = cv2.GaussianBlur(shade, (0, 0), 1.2)
    full = cv2.resize(shade, (W, H), interpolation=cv2.INTER_LINEAR)
    img *= cv2.merge((full, full, full))


# Standard normal quantiles of 256 equal-probability cells: uniform random bytes looked up here
# give Gaussian-shaped sensor noise an order of magnitude faster than drawing normals.
_NORMAL_CELLS = np.asarray([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)])


def _finish(img: np.ndarray, scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Exposure, colour balance, gamma, vignetting, blur and sensor noise."""
    H, W = img.shape[:2]
    flat = img.reshape(H, W * 3)  # row and column factors broadcast over long contiguous rows
    xs = (np.arange(W, dtype=np.float32) - W / 2) / (W / 2)
    ys = (np.arange(H, dtype=np.float32) - H / 2) / (H / 2)
    k = np.float32(rng.uniform(0.0, 0.25))
    gain = (rng.uniform(0.7, 1.3) * rng.uniform(0.97, 1.03, 3)).astype(np.float32)
    flat *= (1 - k * ys ** 2 / 2)[:, None]
    flat *= ((1 - k * xs ** 2)[:, None] * gain[None, :]).reshape(1, W * 3)
    out = cv2.convertScaleAbs(img)  # saturating cast to uint8 (values are non-negative)
    gamma = rng.uniform(0.75, 1.3)
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    out = cv2.LUT(out, lut)
    out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 1.1) * max(scene.s, 0.4))
    sigma = rng.uniform(1.0, 5.0)
    noise_lut = np.round(_NORMAL_CELLS * sigma).astype(np.int16)
    cells = np.frombuffer(rng.bytes(H * W * 3), np.uint8).reshape(H, W, 3)
    return cv2.add(out, cv2.LUT(cells, noise_lut), dtype=cv2.CV_8U)


def render_frame(seed: int | np.random.Generator, size: tuple[int, int] = REFERENCE_SIZE,
                 stats: dict | None = None) -> SyntheticFrame:
    """Render one synthetic frame of `size` (width, height) with its KITTI labels.

    Objects are sampled from `stats` (default `KITTI_STATS`), drawn far to near (by the bottom
    edge of their box, i.e. their depth on the ground plane) into an instance-id mask; then
    `truncated` = fraction of the full box outside the image and `occluded` from the fraction
    of the object's in-image pixels that nearer objects or clutter cover (<= `OCCLUDED_PARTLY`
    -> 0, <= `OCCLUDED_LARGELY` -> 1, else 2; less than `MIN_VISIBLE` of it visible -> its
    visible part becomes a DontCare region). `seed` is an int or a numpy Generator.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    stats = KITTI_STATS if stats is None else stats
    W, H = (int(v) for v in size)
    if W < 32 or H < 16:
        raise ValueError(f"image size must be at least 32x16 (width x height), found {W}x{H}")
    scene = _make_scene(rng, W, H, stats)
    img = np.empty((H, W, 3), np.float32)
    ents = _draw_background(img, scene, rng)
    for cls in SYNTH_CLASSES:
        for _ in range(_count(rng, stats["classes"][cls]["count_probs"])):
            e = _sample_object(cls, scene, rng, stats)
            if e is not None:
                ents.append(e)
    n_groups = _count(rng, stats["classes"]["DontCare"]["count_probs"])
    for g in range(n_groups):
        ents.extend(_sample_dontcare(scene, rng, stats, g))
    _avoid_hiding(ents, scene, rng, stats)
    _shadows(img, scene, rng, ents)
    # Far to near: a larger bottom row is nearer on the ground plane (stable for ties).
    order = sorted(range(len(ents)), key=lambda i: (float(ents[i].box[3]), i))
    ents = [ents[i] for i in order]
    ids = np.zeros((H, W), np.int32)
    regions = {}
    for uid, e in enumerate(ents, 1):
        e.uid = uid
        cv = _Canvas(e.box, W, H)
        ph, pw = cv.mask.shape
        if ph == 0 or pw == 0:
            continue
        x1, y1, x2, y2 = e.box
        _DRAW[e.kind](cv, rng, (x2 - x1) / max(y2 - y1, 1e-6))
        view = img[cv.oy:cv.oy + ph, cv.ox:cv.ox + pw]
        view[:] = cv2.copyTo(cv.rgb, cv.mask, view)
        ids[cv.oy:cv.oy + ph, cv.ox:cv.ox + pw][cv.mask > 0] = uid
        e.drawn = int(cv2.countNonZero(cv.mask))
        regions[uid] = (cv.ox, cv.oy, pw, ph)
    visible = np.bincount(ids.ravel(), minlength=len(ents) + 1)

    rows, dontcare = [], []
    dc_boxes: dict[int, np.ndarray] = {}
    for e in ents:
        if e.group >= 0:
            c = _clip_box(e.box, W, H)
            d = dc_boxes.get(e.group)
            dc_boxes[e.group] = c if d is None else np.r_[np.minimum(d[:2], c[:2]), np.maximum(d[2:], c[2:])]
    for e in ents:
        if not e.label or e.drawn == 0:
            continue
        vis = visible[e.uid] / e.drawn
        if vis < MIN_VISIBLE:
            if visible[e.uid] > 0:
                ox, oy, pw, ph = regions[e.uid]
                yy, xx = np.nonzero(ids[oy:oy + ph, ox:ox + pw] == e.uid)
                dontcare.append(np.array([ox + xx.min(), oy + yy.min(), ox + xx.max(), oy + yy.max()], float))
            continue
        hidden = 1.0 - vis
        occ = 0 if hidden <= OCCLUDED_PARTLY else (1 if hidden <= OCCLUDED_LARGELY else 2)
        clipped = _clip_box(e.box, W, H)
        trunc = float(np.clip(1.0 - _area(clipped) / _area(e.box), 0.0, 1.0))
        st = stats["classes"][e.kind]
        dims = np.maximum(np.asarray(st["dims_mean"]) + 0.5 * rng.standard_normal(3) * np.asarray(st["dims_std"]),
                          0.5 * np.asarray(st["dims_mean"]))
        x1, y1, x2, y2 = e.box
        h = y2 - y1
        z = scene.f * dims[0] / h
        loc = np.array([((x1 + x2) / 2 - scene.cx) * z / scene.f, (y2 - scene.yh) * z / scene.f, z])
        alpha = _alpha_from_aspect((x2 - x1) / h, dims, rng)
        ry = (alpha + math.atan2(loc[0], loc[2]) + math.pi) % (2 * math.pi) - math.pi
        rows.append((e, trunc, occ, alpha, clipped, dims, loc, ry))
    dontcare.extend(dc_boxes[g] for g in sorted(dc_boxes))
    dontcare = [d for d in dontcare if d[2] > d[0] and d[3] > d[1]]

    nd = len(dontcare)
    types = np.asarray([r[0].kind for r in rows] + ["DontCare"] * nd, dtype=object)
    labels = FrameLabels(
        types=types,
        truncated=np.asarray([r[1] for r in rows] + [-1.0] * nd, dtype=np.float64),
        occluded=np.asarray([r[2] for r in rows] + [-1] * nd, dtype=np.int64),
        alpha=np.asarray([r[3] for r in rows] + [-10.0] * nd, dtype=np.float64),
        boxes=np.asarray([r[4] for r in rows] + dontcare, dtype=np.float64).reshape(-1, 4),
        dims=np.asarray([r[5] for r in rows] + [[-1.0, -1.0, -1.0]] * nd, dtype=np.float64).reshape(-1, 3),
        loc=np.asarray([r[6] for r in rows] + [[-1000.0] * 3] * nd, dtype=np.float64).reshape(-1, 3),
        rotation_y=np.asarray([r[7] for r in rows] + [-10.0] * nd, dtype=np.float64),
    )
    image = _finish(img, scene, rng)
    calib = np.array([[scene.f, 0.0, scene.cx, 0.0], [0.0, scene.f, scene.yh, 0.0], [0.0, 0.0, 1.0, 0.0]])
    return SyntheticFrame(
        image=image, labels=labels, instance_mask=ids,
        label_ids=np.asarray([r[0].uid for r in rows] + [0] * nd, dtype=np.int64),
        full_boxes=np.asarray([r[0].box for r in rows] + dontcare, dtype=np.float64).reshape(-1, 4),
        drawn_pixels=np.asarray([r[0].drawn for r in rows] + [0] * nd, dtype=np.int64),
        calib=calib,
    )


# --------------------------------------------------------------------------------------------
# Writing a data set in the official layout
# --------------------------------------------------------------------------------------------

def calib_text(p2: np.ndarray) -> str:
    """A KITTI calib file (P0..P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo) around camera `p2`:
    the colour cameras share P2's intrinsics, the stereo baseline and the sensor extrinsics are
    KITTI's nominal ones (0.54 m; velodyne 0.27 m behind and 0.08 m above the camera)."""
    f = p2[0, 0]
    p0 = p2.copy()
    p1 = p2.copy()
    p1[0, 3] = -0.54 * f
    p3 = p2.copy()
    p3[0, 3] = -0.54 * f
    velo = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -0.08], [1.0, 0.0, 0.0, -0.27]])
    imu = np.array([[1.0, 0.0, 0.0, -0.81], [0.0, 1.0, 0.0, 0.32], [0.0, 0.0, 1.0, -0.8]])
    items = [("P0", p0), ("P1", p1), ("P2", p2), ("P3", p3), ("R0_rect", np.eye(3)),
             ("Tr_velo_to_cam", velo), ("Tr_imu_to_velo", imu)]
    return "".join(f"{k}: " + " ".join(f"{v:.12e}" for v in m.ravel()) + "\n" for k, m in items)


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size: expected WIDTHxHEIGHT such as 1242x375, found {size!r}")
        return int(parts[0]), int(parts[1])
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size: expected (width, height), found {size!r}") from None
    return w, h


STAMP_NAME = "synthetic.json"


def generate(out: str | os.PathLike, num: int, seed: int, size: tuple[int, int] | str = REFERENCE_SIZE,
             val_fraction: float = 0.25, overwrite: bool = False, stats: dict | None = None) -> dict:
    """Write a synthetic KITTI set in the official layout and return a summary.

    Layout: `out/training/image_2/%06d.png`, `out/training/label_2/%06d.txt` (15 fields),
    `out/training/calib/%06d.txt`, `out/ImageSets/{train,val,trainval}.txt`. Frame i is
    rendered from the seed sequence (seed, i), so the same seed gives byte-identical files and
    a larger `num` extends a smaller set; the validation ids are a seeded random
    `val_fraction` of the frames (at least one of each split when num >= 2 and 0 < fraction).
    `out/synthetic.json` records the parameters (see `check_synthetic`).

    Raises:
        ValueError: bad num, seed, size or val_fraction.
        FileExistsError: `out` already holds images or labels and `overwrite` is False.
    """
    if int(num) != num or num < 1:
        raise ValueError(f"num: expected a positive integer, found {num!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, found {seed!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction: expected a number in [0, 1), found {val_fraction!r}")
    num, seed = int(num), int(seed)
    width, height = _parse_size(size)
    if width < 32 or height < 16:
        raise ValueError(f"size: expected at least 32x16 (width x height), found {width}x{height}")
    out = Path(out)
    img_dir, lab_dir, cal_dir = (out / "training" / d for d in ("image_2", "label_2", "calib"))
    sets = out / "ImageSets"
    existing = [p for d in (img_dir, lab_dir, cal_dir) if d.is_dir() for p in d.iterdir()
                if p.suffix in (".png", ".txt")]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} image/label files "
                              f"(e.g. {existing[0]}); pass overwrite=True (--overwrite) to replace them")
    for p in existing:
        p.unlink()
    for d in (img_dir, lab_dir, cal_dir, sets):
        d.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    objects: Counter = Counter()
    for i in range(num):
        frame = render_frame(np.random.default_rng([seed, i]), (width, height), stats)
        ok, png = cv2.imencode(".png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"could not encode frame {i} as PNG")
        (img_dir / f"{i:06d}.png").write_bytes(png.tobytes())
        write_label_file(lab_dir / f"{i:06d}.txt", frame.labels)
        (cal_dir / f"{i:06d}.txt").write_text(calib_text(frame.calib))
        objects.update(frame.labels.types.tolist())
    n_val = int(round(num * val_fraction))
    if num >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), num - 1)
    split_rng = np.random.default_rng([seed, 2**32 - 1])
    val = set(split_rng.choice(num, size=n_val, replace=False).tolist()) if n_val else set()
    ids = [f"{i:06d}" for i in range(num)]
    (sets / "train.txt").write_text("".join(f"{fid}\n" for i, fid in enumerate(ids) if i not in val))
    (sets / "val.txt").write_text("".join(f"{fid}\n" for i, fid in enumerate(ids) if i in val))
    (sets / "trainval.txt").write_text("".join(f"{fid}\n" for fid in ids))
    params = {"num": num, "seed": seed, "size": [width, height], "val_fraction": float(val_fraction)}
    atomic_write_text(out / STAMP_NAME, json.dumps(params, indent=1) + "\n")
    return {
        "out": str(out), "num_images": num, "seed": seed, "size": [width, height],
        "train": num - len(val), "val": len(val),
        "objects": {c: objects.get(c, 0) for c in (*SYNTH_CLASSES, "DontCare")},
        "seconds": round(time.perf_counter() - start, 2),
    }


def check_synthetic(out: str | os.PathLike, num: int, seed: int, size: tuple[int, int] | str = REFERENCE_SIZE,
                    val_fraction: float = 0.25) -> None:
    """Check that the synthetic set in `out` was generated with these parameters.

    Reads `out/synthetic.json` (written by `generate`); a set without it (made before the stamp
    existed) is checked by its number of label files.

    Raises:
        ValueError: the set differs, naming each differing parameter and how to regenerate it.
    """
    out = Path(out)
    width, height = _parse_size(size)
    want = {"num": int(num), "seed": int(seed), "size": [width, height], "val_fraction": float(val_fraction)}
    stamp = out / STAMP_NAME
    if stamp.is_file():
        try:
            have = json.loads(stamp.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{stamp}: not a readable synthetic-set record ({exc})") from exc
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    else:
        n = len(frame_ids_in(out / "training" / "label_2"))
        diff = {} if n == want["num"] else {"num": (n, want["num"])}
    if diff:
        parts = ", ".join(f"{k}: found {h!r}, config asks {w!r}" for k, (h, w) in diff.items())
        raise ValueError(f"{out} holds a synthetic KITTI set made with other parameters ({parts}); "
                         f"delete the folder to regenerate it, or point data.root elsewhere")


def describe_labels(label_dir: str | os.PathLike, classes: tuple[str, ...] = (*SYNTH_CLASSES, "DontCare"),
                    ids: list[str] | None = None) -> dict:
    """Per-class numbers of a label folder, to compare a generated set with real KITTI:
    object count, objects per frame, box-height percentiles (5, 25, 50, 75, 95), fraction
    truncated (> 0.005) and the occlusion-level distribution (0, 1, 2, 3)."""
    label_dir = Path(label_dir)
    ids = frame_ids_in(label_dir) if ids is None else ids
    rows: dict[str, list] = {c: [] for c in classes}
    for fid in ids:
        lab = read_label_file(label_dir / f"{fid}.txt")
        for c in classes:
            sel = lab.types == c
            for k in np.nonzero(sel)[0]:
                rows[c].append((lab.heights[k], lab.truncated[k], lab.occluded[k]))
    out = {"frames": len(ids)}
    for c in classes:
        a = np.asarray(rows[c], dtype=np.float64).reshape(-1, 3)
        d = {"count": len(a), "per_frame": round(len(a) / max(len(ids), 1), 3)}
        if len(a):
            d["height_p5_25_50_75_95"] = [round(float(v), 1) for v in np.percentile(a[:, 0], [5, 25, 50, 75, 95])]
            if c != "DontCare":
                d["truncated_frac"] = round(float(np.mean(a[:, 1] > 0.005)), 3)
                d["occluded_probs"] = [round(float(np.mean(a[:, 2] == v)), 3) for v in range(4)]
        out[c] = d
    return out
