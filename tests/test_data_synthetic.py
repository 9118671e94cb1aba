"""Synthetic KITTI generator: layout, parsing, determinism, labels consistent with the drawing,
statistics that follow the embedded fit, and the fit itself against the real shared labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from toolload import load_tool

from kd_bnn.data.kitti import FrameLabels, read_label_file, read_split, write_label_file
from kd_bnn.data.synthetic import (
    KITTI_STATS,
    MIN_VISIBLE,
    OCCLUDED_LARGELY,
    OCCLUDED_PARTLY,
    QUANTILE_LEVELS,
    STAMP_NAME,
    SYNTH_CLASSES,
    _inv_cdf,
    check_synthetic,
    fit_kitti_statistics,
    generate,
    render_frame,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_LABELS = ROOT.parent / "shared" / "kitti" / "labels_trainval" / "label_2"
W, H = 1242, 375


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    summary = generate(out, num=5, seed=11)
    return out, summary


def _frames(n: int, seed: int = 0, size=(W, H)):
    return [render_frame(np.random.default_rng([seed, i]), size) for i in range(n)]


# ----------------------------------------------------------------------------- layout / files

def test_layout_counts_and_splits(small_set):
    out, summary = small_set
    imgs = sorted((out / "training" / "image_2").glob("*.png"))
    labs = sorted((out / "training" / "label_2").glob("*.txt"))
    cals = sorted((out / "training" / "calib").glob("*.txt"))
    ids = [f"{i:06d}" for i in range(5)]
    assert [p.stem for p in imgs] == ids and [p.stem for p in labs] == ids and [p.stem for p in cals] == ids
    train = read_split(out / "ImageSets" / "train.txt")
    val = read_split(out / "ImageSets" / "val.txt")
    assert len(val) == 1 and len(train) == 4  # round(5 * 0.25)
    assert sorted(train + val) == ids and not set(train) & set(val)
    assert summary["train"] == 4 and summary["val"] == 1 and summary["num_images"] == 5
    img = cv2.imread(str(imgs[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    calib = (out / "training" / "calib" / "000000.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in calib] == [
        "P0", "P1", "P2", "P3", "R0_rect", "Tr_velo_to_cam", "Tr_imu_to_velo"]
    assert len(calib[2].split()) == 13


def test_labels_parse_and_boxes_inside(small_set):
    out, summary = small_set
    total = {c: 0 for c in (*SYNTH_CLASSES, "DontCare")}
    for p in sorted((out / "training" / "label_2").glob("*.txt")):
        for line in p.read_text().splitlines():
            assert len(line.split()) == 15, line
        lab = read_label_file(p, with_score=False)
        assert set(lab.types.tolist()) <= set(total)
        for t in lab.types:
            total[t] += 1
        b = lab.boxes
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0)
        assert np.all(b[:, 2] <= W - 1) and np.all(b[:, 3] <= H - 1)
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
        dc = lab.types == "DontCare"
        assert np.all(lab.truncated[dc] == -1) and np.all(lab.occluded[dc] == -1)
        assert np.all(lab.loc[dc] == -1000) and np.all(lab.rotation_y[dc] == -10)
        obj = ~dc
        assert np.all((lab.truncated[obj] >= 0) & (lab.truncated[obj] <= 1))
        assert set(lab.occluded[obj].tolist()) <= {0, 1, 2}
        assert np.all(lab.dims[obj] > 0) and np.all(lab.loc[obj, 2] > 0)  # plausible 3D fields
        assert np.all(np.abs(lab.alpha[obj]) <= math.pi + 0.01)
    assert total == summary["objects"]
    assert total["Car"] > 0


def test_same_seed_identical_bytes_other_seed_differs(small_set, tmp_path):
    out, _ = small_set
    again = generate(tmp_path / "again", num=2, seed=11)  # frame i depends on (seed, i) only
    assert again["num_images"] == 2
    for sub in ("image_2", "label_2", "calib"):
        for fid in ("000000", "000001"):
            ext = ".png" if sub == "image_2" else ".txt"
            a = (out / "training" / sub / f"{fid}{ext}").read_bytes()
            b = (tmp_path / "again" / "training" / sub / f"{fid}{ext}").read_bytes()
            assert a == b, (sub, fid)
    generate(tmp_path / "other", num=2, seed=12)
    for fid in ("000000", "000001"):
        assert (out / "training/image_2" / f"{fid}.png").read_bytes() != \
            (tmp_path / "other/training/image_2" / f"{fid}.png").read_bytes()
        assert (out / "training/label_2" / f"{fid}.txt").read_bytes() != \
            (tmp_path / "other/training/label_2" / f"{fid}.txt").read_bytes()


def test_refuses_to_overwrite_and_validates_input(small_set, tmp_path):
    out, _ = small_set
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(out, num=1, seed=0)
    with pytest.raises(ValueError, match="num"):
        generate(tmp_path / "a", num=0, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        generate(tmp_path / "a", num=2, seed=0, val_fraction=1.0)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        generate(tmp_path / "a", num=2, seed=0, size="1242by375")
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path / "a", num=2, seed=-1)


def test_overwrite_replaces_a_larger_set(tmp_path):
    generate(tmp_path, num=3, seed=1, size=(320, 96))
    generate(tmp_path, num=1, seed=2, size=(320, 96), overwrite=True)
    assert [p.name for p in (tmp_path / "training" / "image_2").iterdir()] == ["000000.png"]
    assert len(read_split(tmp_path / "ImageSets" / "train.txt")) == 1


def test_check_synthetic_names_each_differing_parameter(tmp_path):
    generate(tmp_path, num=2, seed=3, size=(320, 96), val_fraction=0.5)
    check_synthetic(tmp_path, 2, 3, size=(320, 96), val_fraction=0.5)
    with pytest.raises(ValueError, match=r"num: found 2, config asks 5.*seed: found 3, config asks 4.*delete"):
        check_synthetic(tmp_path, 5, 4, size=(320, 96), val_fraction=0.5)
    with pytest.raises(ValueError, match=r"val_fraction: found 0.5, config asks 0.25"):
        check_synthetic(tmp_path, 2, 3, size=(320, 96))
    (tmp_path / STAMP_NAME).unlink()  # a set made before the stamp: checked by its frame count
    check_synthetic(tmp_path, 2, 99, size=(320, 96))
    with pytest.raises(ValueError, match="num: found 2, config asks 3"):
        check_synthetic(tmp_path, 3, 3, size=(320, 96))


def test_ensure_dataset_refuses_a_stale_synthetic_set(tmp_path):
    from kd_bnn.config import DataConfig
    from kd_bnn.engine.build import ensure_dataset

    cfg = DataConfig(root=str(tmp_path), synthetic={"num": 2, "seed": 0, "size": [320, 96]})
    assert ensure_dataset(cfg) == tmp_path and (tmp_path / STAMP_NAME).is_file()
    ensure_dataset(cfg)  # same parameters: reused
    with pytest.raises(ValueError, match="other parameters"):
        ensure_dataset(cfg.model_copy(update={"synthetic": cfg.synthetic.model_copy(update={"num": 3})}))


def _cli_main():
    return load_tool("make_synthetic").main


def test_cli(tmp_path, capsys):
    main = _cli_main()
    assert main(["--out", str(tmp_path / "c"), "--num", "2", "--seed", "4", "--size", "400x120",
                 "--val-fraction", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["size"] == [400, 120] and summary["train"] == 1 and summary["val"] == 1
    img = cv2.imread(str(tmp_path / "c" / "training" / "image_2" / "000001.png"))
    assert img.shape == (120, 400, 3)
    assert main(["--out", str(tmp_path / "c"), "--num", "2"]) == 2  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "d"), "--size", "big"]) == 2


# ----------------------------------------------------------------------------- labels vs drawing

def _check_frame(fr, width, height):
    lab, ids = fr.labels, fr.instance_mask
    assert fr.image.shape == (height, width, 3) and ids.shape == (height, width)
    for k in range(len(lab)):
        if lab.types[k] == "DontCare":
            continue
        uid = fr.label_ids[k]
        x1, y1, x2, y2 = lab.boxes[k]
        ys, xs = np.nonzero(ids == uid)
        visible = len(xs)
        assert visible > 0
        # Every drawn pixel of the object lies inside its box.
        assert xs.min() >= math.floor(x1) and xs.max() <= math.ceil(x2)
        assert ys.min() >= math.floor(y1) and ys.max() <= math.ceil(y2)
        # Occlusion from the fraction of its drawn pixels still visible.
        frac = visible / fr.drawn_pixels[k]
        assert frac >= MIN_VISIBLE
        hidden = 1 - frac
        expect = 0 if hidden <= OCCLUDED_PARTLY else (1 if hidden <= OCCLUDED_LARGELY else 2)
        assert lab.occluded[k] == expect
        # Independently: nothing nearer drawn inside its box -> fully visible.
        xi1, yi1, xi2, yi2 = int(math.ceil(x1)), int(math.ceil(y1)), int(math.floor(x2)), int(math.floor(y2))
        inside = ids[yi1:yi2 + 1, xi1:xi2 + 1]
        others = np.setdiff1d(np.unique(inside), [0, uid])
        if others.size == 0:
            assert lab.occluded[k] == 0
        if lab.occluded[k] == 2:
            assert others.size > 0
        # Truncation: fraction of the full box outside the image, > 0 exactly when cut.
        fb = fr.full_boxes[k]
        cut = fb[0] < 0 or fb[1] < 0 or fb[2] > width - 1 or fb[3] > height - 1
        area = (fb[2] - fb[0]) * (fb[3] - fb[1])
        assert lab.truncated[k] == pytest.approx(1 - (x2 - x1) * (y2 - y1) / area, abs=1e-9)
        assert (lab.truncated[k] > 0) == cut
        at_border = x1 <= 0 or y1 <= 0 or x2 >= width - 1 or y2 >= height - 1
        assert at_border == cut


def test_truncation_and_occlusion_follow_the_drawing():
    seen = {"trunc": 0, "occ1": 0, "occ2": 0, "free": 0}
    for fr in _frames(8, seed=3):
        _check_frame(fr, W, H)
        obj = fr.labels.types != "DontCare"
        seen["trunc"] += int(np.sum(fr.labels.truncated[obj] > 0))
        seen["occ1"] += int(np.sum(fr.labels.occluded[obj] == 1))
        seen["occ2"] += int(np.sum(fr.labels.occluded[obj] == 2))
        seen["free"] += int(np.sum(fr.labels.occluded[obj] == 0))
    # The cases the checks above are about actually occur.
    assert all(v > 0 for v in seen.values()), seen


def test_small_size_scales_scene():
    for fr in _frames(3, seed=5, size=(640, 192)):
        _check_frame(fr, 640, 192)
        b = fr.labels.boxes
        assert np.all(b[:, 2] <= 639) and np.all(b[:, 3] <= 191)


def test_label_file_round_trip_of_a_frame(tmp_path):
    fr = render_frame(1)
    write_label_file(tmp_path / "x.txt", fr.labels)
    back = read_label_file(tmp_path / "x.txt")
    assert list(back.types) == list(fr.labels.types)
    np.testing.assert_allclose(back.boxes, fr.labels.boxes, atol=0.006)


# ----------------------------------------------------------------------------- statistics

def test_inverse_cdf_reproduces_quantiles():
    q = KITTI_STATS["classes"]["Car"]["height_q"]
    u = (np.arange(20000) + 0.5) / 20000
    samples = np.array([_inv_cdf(q, v, log=True) for v in u])
    for lvl in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert np.quantile(samples, lvl) == pytest.approx(q[QUANTILE_LEVELS.index(lvl)], rel=0.01)


def test_generated_statistics_follow_the_fit():
    # 50 frames at half size (fast); pixel measures are scaled back to KITTI's 375-px height.
    size = (621, 188)
    s = size[1] / H
    frames = _frames(50, seed=21, size=size)
    cls = {c: [] for c in (*SYNTH_CLASSES, "DontCare")}
    for fr in frames:
        lab = fr.labels
        for k in range(len(lab)):
            x1, y1, x2, y2 = lab.boxes[k] / s
            cls[lab.types[k]].append((y2 - y1, (x2 - x1) / (y2 - y1), y2, lab.truncated[k]))
    n = len(frames)
    car = np.array(cls["Car"])
    st = KITTI_STATS["classes"]["Car"]
    assert len(car) / n == pytest.approx(st["mean_count"], rel=0.3)
    ped_rate = len(cls["Pedestrian"]) / n
    assert ped_rate < len(car) / n  # cars dominate, as in KITTI (3.8 vs 0.6 per frame)
    median = st["labelled_height_q"][QUANTILE_LEVELS.index(0.5)]
    assert np.median(car[:, 0]) == pytest.approx(median, rel=0.25)
    q25, q75 = (st["labelled_height_q"][QUANTILE_LEVELS.index(v)] for v in (0.25, 0.75))
    share = np.mean((car[:, 0] >= q25) & (car[:, 0] <= q75))
    assert 0.35 < share < 0.65
    # Perspective: untruncated cars sit on the fitted ground line y2 = a + b h.
    a, b, std = st["ground"]
    untr = car[car[:, 3] == 0]
    slope, icpt = np.polyfit(untr[:, 0], untr[:, 2], 1)
    assert slope == pytest.approx(b, abs=0.15) and icpt == pytest.approx(a, abs=12)
    # Shapes: cars are wider than tall, pedestrians much narrower.
    assert np.median(untr[:, 1]) > 1.0
    if cls["Pedestrian"]:
        ped = np.array(cls["Pedestrian"])
        assert np.median(ped[ped[:, 3] == 0, 1]) < 0.6 if np.any(ped[:, 3] == 0) else True
    dc_rate = len(cls["DontCare"]) / n
    assert dc_rate == pytest.approx(KITTI_STATS["classes"]["DontCare"]["mean_count"], rel=0.4)


def _write_labels(dirpath: Path, frames: list[list[tuple]]):
    dirpath.mkdir(parents=True, exist_ok=True)
    for i, objs in enumerate(frames):
        lab = FrameLabels(
            types=np.array([o[0] for o in objs], dtype=object),
            truncated=np.zeros(len(objs)), occluded=np.zeros(len(objs), dtype=np.int64),
            alpha=np.zeros(len(objs)), boxes=np.array([o[1] for o in objs], float).reshape(-1, 4),
            dims=np.array([o[2] for o in objs], float).reshape(-1, 3),
            loc=np.array([o[3] for o in objs], float).reshape(-1, 3), rotation_y=np.zeros(len(objs)))
        write_label_file(dirpath / f"{i:06d}.txt", lab)


def test_fit_recovers_known_statistics(tmp_path):
    rng = np.random.default_rng(0)
    frames, heights = [], []
    for i in range(40):
        objs = []
        for _ in range(i % 3):  # 0, 1, 2 cars per frame
            h = float(rng.uniform(20, 100))
            heights.append(h)
            xc, lat = 600.0 + rng.uniform(-100, 100), 0.0
            y2 = 180.0 + 1.0 * h  # exact ground line
            z = 721.5377 * 1.5 / h
            lat = (xc - 600.0) / h
            objs.append(("Car", (xc - h, y2 - h, xc + h, y2), (1.5, 1.6, 3.9), (lat * 1.5, 1.6, z)))
        objs.append(("DontCare", (10, 170, 40, 185), (-1, -1, -1), (-1000, -1000, -1000)))
        frames.append(objs)
    # Enough pedestrians for the other classes to be fitted.
    for i in range(25):
        frames[i].append(("Pedestrian", (500, 150, 520, 200), (1.7, 0.6, 0.8), (-1, 1.6, 20)))
    _write_labels(tmp_path / "l", frames)
    stats = fit_kitti_statistics(tmp_path / "l", classes=("Car", "Pedestrian"))
    car = stats["classes"]["Car"]
    assert car["count_probs"] == pytest.approx([14 / 40, 13 / 40, 13 / 40], abs=1e-4)
    assert car["ground"][0] == pytest.approx(180.0, abs=0.01)
    assert car["ground"][1] == pytest.approx(1.0, abs=1e-3)
    # (boxes are written with two decimals: heights within 0.01 px)
    assert car["height_q"] == pytest.approx(np.quantile(heights, QUANTILE_LEVELS).tolist(), abs=0.011)
    assert car["aspect_q"][2][12] == pytest.approx(2.0, abs=1e-3)
    assert stats["cx"] == pytest.approx(600.0, abs=0.5)
    assert stats["classes"]["DontCare"]["mean_count"] == 1.0
    with pytest.raises(ValueError, match="Cyclist"):
        fit_kitti_statistics(tmp_path / "l", classes=("Car", "Cyclist"))


def _assert_close(a, b, path="stats"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=0.011), (path, a, b)  # one rounding unit
    else:
        assert a == b, (path, a, b)


@pytest.mark.skipif(not SHARED_LABELS.is_dir(), reason=f"real KITTI labels not found at {SHARED_LABELS}")
def test_embedded_statistics_match_a_refit_of_the_shared_labels():
    _assert_close(fit_kitti_statistics(SHARED_LABELS), KITTI_STATS)
