"""Every real KITTI training label file parses and round-trips; difficulty counts are sane."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kd_bnn.data.kitti import (
    MAX_OCCLUSION,
    MAX_TRUNCATION,
    MIN_HEIGHT,
    FrameLabels,
    difficulty_of,
    format_labels,
    parse_label_lines,
    read_label_file,
)

FIELDS = ("truncated", "occluded", "alpha", "boxes", "dims", "loc", "rotation_y")


@pytest.fixture(scope="module")
def real_labels(shared_kitti: Path) -> list[FrameLabels]:
    label_dir = shared_kitti / "labels_trainval" / "label_2"
    if not label_dir.is_dir():
        pytest.skip(f"real KITTI label files not found at {label_dir}")
    names = sorted(os.listdir(label_dir))
    assert names == [f"{i:06d}.txt" for i in range(7481)]
    return [read_label_file(label_dir / n, with_score=False) for n in names]


def test_all_real_labels_round_trip(real_labels):
    # format every frame, parse all the text in one go, compare field by field (object order kept)
    text = "".join(format_labels(f) for f in real_labels)
    again = parse_label_lines(text.splitlines(), "<all frames>", with_score=False)
    frame_of = np.repeat(np.arange(len(real_labels)), [len(f) for f in real_labels])
    assert len(again) == len(frame_of) == 51865
    assert again.types.tolist() == [t for f in real_labels for t in f.types]
    for name in FIELDS:
        orig = np.concatenate([getattr(f, name) for f in real_labels])
        bad = np.nonzero((getattr(again, name) != orig).reshape(len(orig), -1).any(1))[0]
        assert bad.size == 0, f"field {name} changed in frame {frame_of[bad[0]]:06d}"
    assert again.scores is None


def test_real_type_counts(real_labels):
    counts = Counter(t for f in real_labels for t in f.types)
    # Object counts of the KITTI 2D training set (7481 frames).
    assert counts == {"Car": 28742, "Pedestrian": 4487, "Cyclist": 1627, "Van": 2914, "Truck": 1094,
                      "Person_sitting": 222, "Tram": 511, "Misc": 973, "DontCare": 11295}


def _level_reference(trunc: float, occ: int, height: float) -> int:
    """Plain per-object reference of the devkit's difficulty rule (ground truth: height > min)."""
    for d in range(3):
        if occ <= MAX_OCCLUSION[d] and trunc <= MAX_TRUNCATION[d] and height > MIN_HEIGHT[d]:
            return d
    return -1


def test_real_difficulty_counts(real_labels):
    levels: dict[str, Counter] = {c: Counter() for c in ("Car", "Pedestrian", "Cyclist")}
    for k, frame in enumerate(real_labels):
        lv = difficulty_of(frame)
        for j in range(len(frame)):  # the vectorised rule against the plain reference
            assert lv[j] == _level_reference(frame.truncated[j], frame.occluded[j], frame.heights[j]), k
        for t, d in zip(frame.types, lv):
            if t in levels:
                levels[t][int(d)] += 1
    car = levels["Car"]
    easy, moderate, hard = car[0], car[0] + car[1], car[0] + car[1] + car[2]  # cumulative, as evaluated
    assert (easy, moderate, hard) == (5968, 15706, 21710)
    assert sum(car.values()) == 28742
    for cls, c in levels.items():
        total = sum(c.values())
        cum = np.cumsum([c[0], c[1], c[2]])
        assert 0 < cum[0] < cum[1] < cum[2] <= total, cls
        assert cum[2] > 0.7 * total, cls  # most objects count for Hard
