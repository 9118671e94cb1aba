"""KITTI 2D evaluation: hand-worked cases, a plain-loop reference of the devkit, file I/O, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from toolload import load_tool

from kd_bnn.data.kitti import FIELD_NAMES, FrameLabels, KittiFormatError
from kd_bnn.eval.kitti import (
    detections_to_frame,
    evaluate_kitti,
    evaluate_kitti_dirs,
    format_result_lines,
    write_kitti_results,
)
from kd_bnn.eval.report import plot_pr_curves, report_dict, save_json

DIFFS = ("easy", "moderate", "hard")


# ----------------------------------------------------------------------------- helpers
def gt_frame(objs) -> FrameLabels:
    """objs: (type, box, truncated, occluded)."""
    n = len(objs)
    return FrameLabels(
        types=np.array([o[0] for o in objs], dtype=object),
        truncated=np.array([o[2] for o in objs], dtype=float),
        occluded=np.array([o[3] for o in objs], dtype=np.int64),
        alpha=np.zeros(n), boxes=np.array([o[1] for o in objs], dtype=float).reshape(-1, 4),
        dims=np.zeros((n, 3)), loc=np.zeros((n, 3)), rotation_y=np.zeros(n))


def det_frame(objs) -> FrameLabels:
    """objs: (type, box, score)."""
    n = len(objs)
    return FrameLabels(
        types=np.array([o[0] for o in objs], dtype=object), truncated=-np.ones(n),
        occluded=-np.ones(n, dtype=np.int64), alpha=np.full(n, -10.0),
        boxes=np.array([o[1] for o in objs], dtype=float).reshape(-1, 4), dims=-np.ones((n, 3)),
        loc=np.full((n, 3), -1000.0), rotation_y=np.full(n, -10.0),
        scores=np.array([o[2] for o in objs], dtype=float))


def many_cars(n=80):
    """n easy cars (one per frame, 100x50 px) perfectly detected with scores 1 - i/100."""
    gt, det = {}, {}
    for i in range(n):
        box = [100.0, 100.0, 200.0, 150.0]
        gt[f"{i:06d}"] = gt_frame([("Car", box, 0.0, 0)])
        det[f"{i:06d}"] = det_frame([("Car", box, 1.0 - i / 100)])
    return gt, det


def add(frames, fid, fl, kind):
    old = frames[fid]
    objs = []
    mk = gt_frame if kind == "gt" else det_frame
    for k in range(len(old)):
        if kind == "gt":
            objs.append((old.types[k], old.boxes[k], old.truncated[k], old.occluded[k]))
        else:
            objs.append((old.types[k], old.boxes[k], old.scores[k]))
    frames[fid] = mk(objs + fl)


# ----------------------------------------------------------------------------- plain reference
def ref_eval(gt: dict, det: dict, cls: str, diff: int):
    """Direct loop-by-loop transcription of the devkit's eval_class (slow, for small cases)."""
    MINH, MAXO, MAXT = (40, 25, 25), (0, 1, 2), (0.15, 0.3, 0.5)
    minov = {"car": 0.7, "pedestrian": 0.5, "cyclist": 0.5}[cls]
    neigh = {"car": "van", "pedestrian": "person_sitting"}.get(cls)
    NO = -10000000.0

    def ov(a, b, crit):
        x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            return 0.0
        inter = w * h
        aa = (a[2] - a[0]) * (a[3] - a[1])
        ba = (b[2] - b[0]) * (b[3] - b[1])
        return inter / (aa + ba - inter) if crit == -1 else inter / aa

    def clean(g, d):
        ig, idt, dc, n = [], [], [], 0
        for k in range(len(g)):
            t = str(g.types[k]).lower()
            h = g.boxes[k][3] - g.boxes[k][1]
            vc = 1 if t == cls else (0 if t == neigh else -1)
            ign = g.occluded[k] > MAXO[diff] or g.truncated[k] > MAXT[diff] or h <= MINH[diff]
            if vc == 1 and not ign:
                ig.append(0)
                n += 1
            elif vc == 0 or (ign and vc == 1):
                ig.append(1)
            else:
                ig.append(-1)
            if t == "dontcare":
                dc.append(g.boxes[k])
        for k in range(len(d)):
            vc = 1 if str(d.types[k]).lower() == cls else -1
            h = int(abs(d.boxes[k][1] - d.boxes[k][3]))
            idt.append(1 if h < MINH[diff] else (0 if vc == 1 else -1))
        return ig, idt, dc, n

    def stats(g, d, ig, idt, dc, compute_fp, thresh=0.0):
        tp = fp = fn = 0
        v = []
        assigned = [False] * len(d)
        below = [compute_fp and d.scores[j] < thresh for j in range(len(d))]
        for i in range(len(g)):
            if ig[i] == -1:
                continue
            det_idx, valid, maxov, ass_ign = -1, NO, 0.0, False
            for j in range(len(d)):
                if idt[j] == -1 or assigned[j] or below[j]:
                    continue
                o = ov(d.boxes[j], g.boxes[i], -1)
                if not compute_fp and o > minov and d.scores[j] > valid:
                    det_idx, valid = j, d.scores[j]
                elif compute_fp and o > minov and (o > maxov or ass_ign) and idt[j] == 0:
                    maxov, det_idx, valid, ass_ign = o, j, 1, False
                elif compute_fp and o > minov and valid == NO and idt[j] == 1:
                    det_idx, valid, ass_ign = j, 1, True
            if valid == NO and ig[i] == 0:
                fn += 1
            elif valid != NO and (ig[i] == 1 or idt[det_idx] == 1):
                assigned[det_idx] = True
            elif valid != NO:
                tp += 1
                v.append(d.scores[det_idx])
                assigned[det_idx] = True
        if compute_fp:
            for j in range(len(d)):
                if not (assigned[j] or idt[j] in (-1, 1) or below[j]):
                    fp += 1
            for box in dc:
                for j in range(len(d)):
                    if assigned[j] or idt[j] in (-1, 1) or below[j]:
                        continue
                    if ov(d.boxes[j], box, 0) > minov:
                        assigned[j] = True
                        fp -= 1
        return tp, fp, fn, v

    n_gt, v, cache = 0, [], []
    empty = det_frame([])
    for fid, g in gt.items():
        d = det.get(fid, empty)
        ig, idt, dc, n = clean(g, d)
        n_gt += n
        cache.append((g, d, ig, idt, dc))
        v += stats(g, d, ig, idt, dc, False)[3]
    v = sorted(v, reverse=True)
    thr, cur = [], 0.0
    for i in range(len(v)):
        lr = (i + 1) / n_gt
        rr = (i + 2) / n_gt if i < len(v) - 1 else lr
        if (rr - cur) < (cur - lr) and i < len(v) - 1:
            continue
        thr.append(v[i])
        cur += 1.0 / 40.0
    prec = [0.0] * 41
    for t_i, t in enumerate(thr):
        tp = fp = 0
        for g, d, ig, idt, dc in cache:
            a, b, _, _ = stats(g, d, ig, idt, dc, True, t)
            tp, fp = tp + a, fp + b
        prec[t_i] = tp / (tp + fp) if tp + fp else float("nan")
    for i in range(len(thr)):
        prec[i] = max(prec[i:])
    return np.array(prec)


def random_case(seed: int, n_frames: int = 12):
    rng = np.random.default_rng(seed)
    gt_types = ["Car", "Van", "Pedestrian", "Person_sitting", "Cyclist", "DontCare", "Truck", "car"]
    det_types = ["Car", "Pedestrian", "Cyclist", "car", "Van", "Foo"]
    gt, det = {}, {}

    def rbox(base=None):
        if base is not None and rng.random() < 0.7:
            return np.sort((base + rng.normal(0, rng.choice([0.5, 3, 8]), 4)).reshape(2, 2), 0).ravel()
        h = float(rng.choice([rng.uniform(5, 100), 25.0, 40.0, 24.99, 39.99, 40.01]))
        w, x, y = rng.uniform(5, 120), rng.uniform(0, 300), rng.uniform(0, 150)
        return np.array([x, y, x + w, y + h])

    for f in range(n_frames):
        g = []
        for _ in range(rng.integers(0, 7)):
            t = str(rng.choice(gt_types))
            b = rbox(g[rng.integers(len(g))][1] if g and rng.random() < 0.3 else None)
            g.append((t, b, float(rng.choice([0, 0.15, 0.2, 0.3, 0.5, 0.6])), int(rng.integers(0, 4))))
        d = []
        for _ in range(rng.integers(0, 10)):
            base = g[rng.integers(len(g))][1] if g else None
            d.append((str(rng.choice(det_types)), rbox(base),
                      float(rng.choice([rng.random(), round(rng.random(), 1)]))))
        gt[f"{f:06d}"], det[f"{f:06d}"] = gt_frame(g), det_frame(d)
    return gt, det


# ----------------------------------------------------------------------------- hand-worked cases
def test_perfect_detections_give_100():
    gt, det = many_cars(80)
    for i in range(80):  # pedestrians and cyclists too
        fid = f"{i:06d}"
        add(gt, fid, [("Pedestrian", [400, 100, 430, 190], 0.0, 0),
                      ("Cyclist", [600, 100, 640, 190], 0.0, 0)], "gt")
        add(det, fid, [("Pedestrian", [400, 100, 430, 190], 0.5 + i / 100),
                       ("Cyclist", [600, 100, 640, 190], 0.9 - i / 100)], "det")
    res = evaluate_kitti(gt, det)
    for c in ("Car", "Pedestrian", "Cyclist"):
        for kind in ("R11", "R40"):
            for d in DIFFS:
                assert res.ap[c][kind][d] == pytest.approx(100.0), (c, kind, d)
    assert res.num_gt["Car"] == (80, 80, 80)


def test_forty_gt_devkit_index_quirk():
    # with exactly 40 ground truths the devkit gets 40 thresholds only: precision[40] stays 0
    gt, det = many_cars(40)
    res = evaluate_kitti(gt, det, classes=("Car",))
    assert res.ap["Car"]["R40"]["easy"] == pytest.approx(39 / 40 * 100)
    assert res.ap["Car"]["R11"]["easy"] == pytest.approx(10 / 11 * 100)
    gt, det = many_cars(41)  # 41 true positives fill all 41 sample points
    assert evaluate_kitti(gt, det, classes=("Car",)).ap["Car"]["R40"]["easy"] == pytest.approx(100.0)


def test_one_false_positive_at_known_rank_r11_vs_r40():
    # 80 TPs (scores 1.00 .. 0.21) and one FP scored between the 40th and 41st TP.
    # Thresholds sit at TP indices 0,1,3,...,79 (tp = 1, 2, 4, ..., 80); the FP counts from
    # threshold 21 on: precision 1 for thresholds 0..20, 2j/(2j+1) for j >= 21, whose running
    # maximum from the right is 80/81. R40 = (20 + 20*80/81)/40, R11 = (6 + 5*80/81)/11.
    gt, det = many_cars(80)
    add(det, "000000", [("Car", [500, 100, 600, 150], 1.0 - 39.5 / 100)], "det")
    res = evaluate_kitti(gt, det, classes=("Car",))
    r40 = (20 + 20 * 80 / 81) / 40 * 100
    r11 = (6 + 5 * 80 / 81) / 11 * 100
    for d in DIFFS:
        assert res.ap["Car"]["R40"][d] == pytest.approx(r40, abs=1e-4)
        assert res.ap["Car"]["R11"][d] == pytest.approx(r11, abs=1e-4)
    assert r40 == pytest.approx(99.382716, abs=1e-6) and r11 == pytest.approx(99.438833, abs=1e-6)
    # interpolated precision curve: 21 ones then 80/81, recall (i+1)/80 at threshold i
    p = res.precision["Car"][0]
    np.testing.assert_allclose(p[:21], 1.0)
    np.testing.assert_allclose(p[21:], 80 / 81)


def test_small_gt_count_thresholds_by_hand():
    # 4 cars, TP scores .9 .8 .6 .5, FP at .7: thresholds [.9 .8 .6 .5], precision 1 1 .75 .8,
    # interpolated 1 1 .8 .8 then zeros: R40 = 2.6/40, R11 = 1/11 (devkit behaviour)
    gt = {"a": gt_frame([("Car", [10 + 120 * k, 10, 110 + 120 * k, 60], 0.0, 0) for k in range(4)])}
    dets = [("Car", [10 + 120 * k, 10, 110 + 120 * k, 60], s) for k, s in enumerate([.9, .8, .6, .5])]
    det = {"a": det_frame(dets + [("Car", [10, 200, 110, 250], 0.7)])}
    res = evaluate_kitti(gt, det, classes=("Car",))
    assert res.ap["Car"]["R40"]["easy"] == pytest.approx(6.5)
    assert res.ap["Car"]["R11"]["easy"] == pytest.approx(100 / 11)
    np.testing.assert_allclose(res.thresholds["Car"][0], [.9, .8, .6, .5])


def test_dontcare_absorbs_unmatched_detection():
    gt, det = many_cars(80)
    # a large DontCare region; the FP car lies inside it (IoU with the region is small, but the
    # devkit measures intersection over the detection's area)
    add(gt, "000003", [("DontCare", [400, 50, 900, 300], -1.0, -1)], "gt")
    add(det, "000003", [("Car", [500, 100, 600, 150], 0.95)], "det")
    res = evaluate_kitti(gt, det, classes=("Car",))
    assert res.ap["Car"]["R40"]["moderate"] == pytest.approx(100.0)
    # the same detection outside the region is a false positive
    gt2, det2 = many_cars(80)
    add(gt2, "000003", [("DontCare", [700, 50, 900, 300], -1.0, -1)], "gt")
    add(det2, "000003", [("Car", [500, 100, 600, 150], 0.95)], "det")
    assert evaluate_kitti(gt2, det2, classes=("Car",)).ap["Car"]["R40"]["moderate"] < 99.0


def test_van_matched_by_car_detection_is_not_a_false_positive():
    gt, det = many_cars(80)
    add(gt, "000005", [("Van", [400, 100, 520, 170], 0.0, 0)], "gt")
    add(det, "000005", [("Car", [402, 101, 520, 170], 0.97)], "det")
    assert evaluate_kitti(gt, det, classes=("Car",)).ap["Car"]["R40"]["easy"] == pytest.approx(100.0)
    # a Truck is not a neighbour of Car: the same detection is a false positive
    gt2, det2 = many_cars(80)
    add(gt2, "000005", [("Truck", [400, 100, 520, 170], 0.0, 0)], "gt")
    add(det2, "000005", [("Car", [402, 101, 520, 170], 0.97)], "det")
    assert evaluate_kitti(gt2, det2, classes=("Car",)).ap["Car"]["R40"]["easy"] < 99.0


def test_too_small_detection_is_ignored_by_difficulty():
    # height 39.99 -> int 39 < 40: ignored for Easy, a false positive for Moderate/Hard (min 25)
    gt, det = many_cars(80)
    add(det, "000007", [("Car", [500, 100, 580, 139.99], 0.99)], "det")
    ap = evaluate_kitti(gt, det, classes=("Car",)).ap["Car"]["R40"]
    assert ap["easy"] == pytest.approx(100.0)
    assert ap["moderate"] < 100.0 and ap["hard"] < 100.0
    # height 40.5 -> int 40, not < 40: counted for Easy as well
    gt, det = many_cars(80)
    add(det, "000007", [("Car", [500, 100, 580, 140.5], 0.99)], "det")
    assert evaluate_kitti(gt, det, classes=("Car",)).ap["Car"]["R40"]["easy"] < 100.0


def test_ground_truth_height_boundary_is_inclusive():
    # a ground truth exactly 40 px high is ignored for Easy (height <= 40), valid for Moderate
    gt = {"a": gt_frame([("Car", [0, 0, 100, 40], 0.0, 0), ("Car", [200, 0, 300, 41], 0.0, 0)])}
    det = {"a": det_frame([])}
    res = evaluate_kitti(gt, det, classes=("Car",))
    assert res.num_gt["Car"] == (1, 2, 2)


def test_no_detections_gives_zero_and_not_evaluated():
    gt, _ = many_cars(10)
    res = evaluate_kitti(gt, {}, classes=("Car",))
    assert res.ap["Car"]["R40"]["easy"] == 0.0 and not res.evaluated["Car"]
    assert res.missing_results == 10


# ----------------------------------------------------------------------------- reference property
@pytest.mark.parametrize("seed", range(6))
def test_matches_plain_loop_reference(seed):
    gt, det = random_case(seed)
    res = evaluate_kitti(gt, det)
    for c in ("Car", "Pedestrian", "Cyclist"):
        for d in range(3):
            ref = ref_eval(gt, det, c.lower(), d)
            np.testing.assert_array_equal(np.isnan(res.precision[c][d]), np.isnan(ref))
            np.testing.assert_allclose(res.precision[c][d], ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- files and JSON
def _write_dir(root: Path, frames: dict, results: bool):
    root.mkdir(parents=True, exist_ok=True)
    for fid, fl in frames.items():
        lines = []
        for k in range(len(fl)):
            b = fl.boxes[k]
            if results:
                lines.append(f"{fl.types[k]} -1 -1 -10 {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f} "
                             f"-1 -1 -1 -1000 -1000 -1000 -10 {fl.scores[k]:.6f}")
            else:
                lines.append(f"{fl.types[k]} {fl.truncated[k]:.2f} {int(fl.occluded[k])} 0 {b[0]:.2f} "
                             f"{b[1]:.2f} {b[2]:.2f} {b[3]:.2f} 1 1 1 1 1 1 0")
        (root / f"{fid}.txt").write_text("".join(x + "\n" for x in lines))


def test_dirs_match_in_memory_and_json_shape(tmp_path):
    gt, det = random_case(11, n_frames=15)
    for fl in list(gt.values()) + list(det.values()):  # the file precision
        fl.boxes[:] = np.round(fl.boxes, 2)
        fl.truncated[:] = np.round(fl.truncated, 2)
        if fl.scores is not None:
            fl.scores[:] = np.round(fl.scores, 6)
    _write_dir(tmp_path / "gt", gt, False)
    _write_dir(tmp_path / "det", det, True)
    (tmp_path / "split.txt").write_text("\n".join(gt) + "\n")
    a = evaluate_kitti_dirs(tmp_path / "gt", tmp_path / "det", tmp_path / "split.txt")
    b = evaluate_kitti(gt, det)
    assert a.ap == b.ap
    js = a.to_json()
    assert set(js) == {"bbox_2d"} and set(js["bbox_2d"]) == {"Car", "Pedestrian", "Cyclist"}
    for c in js["bbox_2d"].values():
        assert set(c) == {"R11", "R40"}
        for k in c.values():
            assert set(k) == set(DIFFS) and all(isinstance(v, float) for v in k.values())
    assert a.unknown_classes.get("Foo", 0) > 0
    out = save_json(tmp_path / "r.json", a)
    assert json.loads(out.read_text())["bbox_2d"]["Car"]["R40"]["easy"] == pytest.approx(
        a.ap["Car"]["R40"]["easy"])
    assert "Car" in a.table() and "R40 moderate" in a.table()
    assert report_dict(a)["bbox_2d"] == js["bbox_2d"]


def test_missing_result_files_warn_once_or_fail_strict(tmp_path):
    gt, det = many_cars(6)
    _write_dir(tmp_path / "gt", gt, False)
    _write_dir(tmp_path / "det", {k: v for k, v in det.items() if k not in ("000001", "000004")}, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate_kitti_dirs(tmp_path / "gt", tmp_path / "det")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and msgs[0].startswith("2 of 6 result files missing")
    assert res.missing_results == 2
    with pytest.raises(FileNotFoundError, match="000001.txt, 000004.txt"):
        evaluate_kitti_dirs(tmp_path / "gt", tmp_path / "det", strict=True)


@pytest.mark.parametrize("line,match", [
    ("Car -1 -1 -10 10 20 nan 80 -1 -1 -1 -1000 -1000 -1000 -10 0.5", r"000001\.txt:2: field 'x2'"),
    ("Car -1 -1 -10 10 80 50 20 -1 -1 -1 -1000 -1000 -1000 -10 0.5", r"000001\.txt:2: negative-size"),
    ("Car -1 -1 -10 10 20 50 80 -1 -1 -1 -1000 -1000 -1000 -10", r"000001\.txt:2: expected 16 fields"),
    ("Car -1 -1 -10 10 20 50 80 -1 -1 -1 -1000 -1000 -1000 -10 x", r"000001\.txt:2: field 'score'"),
])
def test_bad_result_lines_name_file_and_line(tmp_path, line, match):
    gt, det = many_cars(3)
    _write_dir(tmp_path / "gt", gt, False)
    _write_dir(tmp_path / "det", det, True)
    p = tmp_path / "det" / "000001.txt"
    p.write_text(p.read_text() + line + "\n")
    with pytest.raises(KittiFormatError, match=match):
        evaluate_kitti_dirs(tmp_path / "gt", tmp_path / "det")


def test_in_memory_bad_values_and_empty_split(tmp_path):
    gt, det = many_cars(2)
    det["000001"].boxes[0, 2] = np.nan
    with pytest.raises(ValueError, match="frame '000001'"):
        evaluate_kitti(gt, det)
    det["000001"].boxes[0] = [10, 10, 5, 50]
    with pytest.raises(ValueError, match="negative-size"):
        evaluate_kitti(gt, det)
    (tmp_path / "empty.txt").write_text("\n")
    _write_dir(tmp_path / "gt", gt, False)
    with pytest.raises(KittiFormatError, match="empty"):
        evaluate_kitti_dirs(tmp_path / "gt", tmp_path / "gt", tmp_path / "empty.txt")


def test_writer_format_and_roundtrip(tmp_path):
    names = ["Car", "Pedestrian", "Cyclist"]
    p = write_kitti_results(tmp_path / "res", 7, np.array([[1.234, 2, 30.5, 40], [5, 6, 7, 8]]),
                            [0.9, 0.25], [0, 2], names)
    assert p.name == "000007.txt"
    lines = p.read_text().splitlines()
    assert lines[0] == "Car -1 -1 -10 1.23 2.00 30.50 40.00 -1 -1 -1 -1000 -1000 -1000 -10 0.900000"
    assert lines[1].split()[0] == "Cyclist" and len(lines[1].split()) == 16
    assert not any(f.name.endswith(".tmp") for f in (tmp_path / "res").iterdir())
    assert write_kitti_results(tmp_path / "res", "000008", np.zeros((0, 4)), [], [], names
                               ).read_text() == ""
    with pytest.raises(ValueError, match="negative-size"):
        format_result_lines([[5, 5, 1, 10]], [0.5], [0], names)
    with pytest.raises(ValueError, match="label out of range"):
        format_result_lines([[0, 0, 1, 10]], [0.5], [3], names)


def test_detections_to_frame_clips_and_names():
    torch = pytest.importorskip("torch")
    from kd_bnn.models.detector import Detections

    d = Detections(torch.tensor([[-5.0, 10, 50, 400], [100, 20, 1300, 60]]), torch.tensor([0.8, 0.3]),
                   torch.tensor([1, 0]))
    fl = detections_to_frame(d, ["Car", "Pedestrian"], (375, 1242))
    np.testing.assert_allclose(fl.boxes, [[0, 10, 50, 375], [100, 20, 1242, 60]])
    assert list(fl.types) == ["Pedestrian", "Car"]
    np.testing.assert_allclose(fl.scores, [0.8, 0.3], rtol=1e-6)
    assert (fl.alpha == -10).all()


def test_pr_plot_written(tmp_path):
    gt, det = many_cars(20)
    res = evaluate_kitti(gt, det, classes=("Car",))
    paths = plot_pr_curves(res, tmp_path / "plots")
    assert [p.name for p in paths] == ["car_detection.png"] and paths[0].stat().st_size > 1000


# ----------------------------------------------------------------------------- the real devkit
DEVKIT_SRC = Path(os.environ.get("KD_BNN_DEVKIT_SRC", "/tmp/kitti_devkit/evaluate_object_2d.cpp"))


@pytest.mark.slow
def test_agrees_with_devkit_binary(tmp_path, shared_kitti):
    """Builds a 2D-only copy of the devkit's evaluate_object.cpp (not shipped) and compares."""
    if not DEVKIT_SRC.is_file():
        pytest.skip(f"devkit source not found at {DEVKIT_SRC} (set KD_BNN_DEVKIT_SRC)")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not available to build the devkit")
    binary = tmp_path / "evaluate_object_2d"
    subprocess.run([gxx, "-O3", "-o", str(binary), str(DEVKIT_SRC)], check=True)
    from kd_bnn.eval.bench import benchmark

    rows = benchmark(shared_kitti / "labels_trainval" / "label_2", shared_kitti / "ImageSets" / "val.txt",
                     seeds=(0, 1), devkit=str(binary), repeats=1, work_dir=tmp_path)
    for r in rows:
        assert r.max_abs_diff is not None and r.max_abs_diff < 0.01, r.seed
        assert r.ours_s <= 2 * r.devkit_s + 0.5, (r.ours_s, r.devkit_s)
    assert not math.isnan(rows[0].ours.ap["Car"]["R40"]["moderate"])


def test_cli_eval_table_json_and_strict(tmp_path, capsys):
    cli = load_tool("eval")
    gt, det = many_cars(4)
    _write_dir(tmp_path / "gt", gt, False)
    _write_dir(tmp_path / "det", {k: v for k, v in det.items() if k != "000002"}, True)
    (tmp_path / "split.txt").write_text("000000\n000001\n000002\n")
    rc = cli.main(["--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "det"),
                   "--split", str(tmp_path / "split.txt"), "--json", str(tmp_path / "o.json")])
    out = capsys.readouterr()
    assert rc == 0 and "Pedestrian" in out.out and "1 of 3 result files missing" in out.err
    assert set(json.loads((tmp_path / "o.json").read_text())) == {"bbox_2d"}
    rc = cli.main(["--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "det"), "--strict"])
    assert rc == 2 and "000002.txt" in capsys.readouterr().err


def test_frame_chunking_gives_identical_results(monkeypatch):
    import kd_bnn.eval.kitti as K

    gt, det = random_case(21, n_frames=30)
    whole = evaluate_kitti(gt, det)
    orig = K._frame_chunks
    monkeypatch.setattr(K, "_frame_chunks", lambda *a, **k: orig(*a, max_pairs=7))
    chunked = evaluate_kitti(gt, det)
    assert chunked.ap == whole.ap


# ----------------------------------------------------------------------------- bad input (safety issue)
# The fast bulk reader must refuse what `kd_bnn.data.kitti.read_label_file` refuses, with the same
# one-line file:line messages, and must not lose or misplace objects.
def _bad_input_case(tmp_path, n=3):
    gt, det = many_cars(n)
    _write_dir(tmp_path / "gt", gt, False)
    _write_dir(tmp_path / "det", det, True)
    return tmp_path / "gt", tmp_path / "det"


@pytest.mark.parametrize("kind,field,token", [
    ("gt", "x2", "inf"), ("gt", "y1", "-inf"), ("gt", "truncated", "inf"),
    ("gt", "alpha", "-inf"), ("gt", "z", "inf"),  # a field the 2D evaluation does not read
    ("det", "score", "inf"), ("det", "score", "-inf"), ("det", "x1", "-inf"), ("det", "h", "inf"),
])
def test_non_finite_value_in_gt_or_results_names_file_line_field(tmp_path, kind, field, token):
    # repro: `inf` in ground truth or as a result score was accepted (only nan was refused)
    gt, det = _bad_input_case(tmp_path)
    p = (gt if kind == "gt" else det) / "000001.txt"
    toks = p.read_text().split()
    toks[FIELD_NAMES.index(field)] = token
    p.write_text(p.read_text() + " ".join(toks) + "\n")  # a second line
    with pytest.raises(KittiFormatError) as err:
        evaluate_kitti_dirs(gt, det)
    assert str(err.value) == f"{p}:2: field '{field}': expected a finite number, found '{token}'"


def test_non_finite_in_memory_detections_and_writer_refused():
    gt, det = many_cars(2)
    det["000001"].scores[0] = np.inf
    with pytest.raises(ValueError, match=r"frame '000001', object 0: expected finite numbers.*score inf"):
        evaluate_kitti(gt, det)
    with pytest.raises(ValueError, match=r"detection 0: expected finite numbers, found box \[0.0, 0.0, inf"):
        format_result_lines([[0, 0, np.inf, 10]], [0.5], [0], ["Car"])
    with pytest.raises(ValueError, match=r"detection 0: expected finite numbers.*score -inf"):
        format_result_lines([[0, 0, 10, 10]], [-np.inf], [0], ["Car"])


@pytest.mark.parametrize("kind", ["gt", "det"])
def test_bom_prefixed_file_keeps_its_first_object(tmp_path, kind):
    # repro: a ground-truth file saved "UTF-8 with BOM" silently lost its first object
    gt, det = _bad_input_case(tmp_path, 45)  # > 40 true positives: perfect detection is AP 100
    want = evaluate_kitti_dirs(gt, det)
    folder = gt if kind == "gt" else det
    for fid in ("000000", "000007"):
        p = folder / f"{fid}.txt"
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    got = evaluate_kitti_dirs(gt, det)
    assert got.ap == want.ap and got.num_gt == want.num_gt and got.unknown_classes == {}
    assert got.ap["Car"]["R40"]["easy"] == 100.0
    from kd_bnn.eval.kitti import read_kitti_dir

    flat, _ = read_kitti_dir(folder, ["000000", "000001"], results=kind == "det")
    assert flat.raw_types.tolist() == ["Car", "Car"] and flat.offsets.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", ["gt", "det"])
@pytest.mark.parametrize("where", ["type", "number"])
def test_non_utf8_file_is_one_line_error_naming_file_and_line(tmp_path, kind, where):
    # repro: a Latin-1 file was decoded with replacement characters and scored without a word
    gt, det = _bad_input_case(tmp_path)
    p = (gt if kind == "gt" else det) / "000002.txt"
    first = p.read_bytes()
    toks = first.split()
    if where == "type":
        toks[0] = b"Caf\xe9"
    else:
        toks[4] = b"1\xe90"
    p.write_bytes(first + b" ".join(toks) + b"\n")
    with pytest.raises(KittiFormatError) as err:
        evaluate_kitti_dirs(gt, det)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{p}:2: not a UTF-8 text file (byte 0xe9 at offset ")


def test_bulk_reader_keeps_objects_in_their_own_frame(tmp_path):
    # a blank line in one file and two objects on one line of another used to balance out in the
    # global token count: the second file's first object went to the first frame
    gt, det = _bad_input_case(tmp_path, 2)
    a, b = gt / "000000.txt", gt / "000001.txt"
    a.write_text(a.read_text() + "\n")
    one = b.read_text().strip()
    b.write_text(one + " " + one + "\n")
    with pytest.raises(KittiFormatError, match=rf"{b.name}:1: expected 15 fields .*found 30"):
        evaluate_kitti_dirs(gt, det)
    # blank lines, CRLF and CR line ends stay fine, objects stay in their frame
    b.write_text("\n" + one + "\r\n\r\n  \n" + one.replace("100.00 100.00 200.00", "300.00 100.00 400.00") + "\r")
    from kd_bnn.eval.kitti import read_kitti_dir

    flat, _ = read_kitti_dir(gt, ["000000", "000001"], results=False)
    assert flat.offsets.tolist() == [0, 1, 3] and flat.boxes[:, 0].tolist() == [100.0, 100.0, 300.0]
