"""Bad input in the data path (safety issue items 7, 11 and the label part of 12): each rule with
the exact reproduction from the issue.

Labels: a BOM is stripped; unknown / wrong-case types give one warning per split (with a case
hint); nan/inf/-inf anywhere (the score of result lines included) are refused with file:line and
field; an inverted box is refused for training (file:line), kept in ground truth read for the
devkit evaluator (it ignores or misses it, as the devkit does) and refused in result files; a file
that is not UTF-8 is a one-line ValueError naming file and line.
Images: the preflight names every image that is missing, unreadable, implausibly sized or cut
short; an image that fails to decode during a run is skipped (replaced by the next readable frame,
the same in every run) with one warning naming the file, and an evaluation pass warns with the
number of frames it skipped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from toolload import load_tool

from kd_bnn.config import DataConfig, ExperimentConfig
from kd_bnn.data import (
    KittiDataset,
    KittiDatasetError,
    KittiDataWarning,
    KittiFormatError,
    build_datasets,
    build_loader,
    check_image,
    eval_transforms,
    parse_label_lines,
    read_label_file,
    read_split,
    train_transforms,
)
from kd_bnn.engine.preflight import check_dataset, check_experiment
from kd_bnn.eval.kitti import evaluate_kitti_dirs

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 192)


def line(typ: str = "Car", box=(10, 5, 30, 25), score: str | None = None, **fields: str) -> str:
    vals = {"truncated": "0.00", "occluded": "0", "alpha": "0.00", "x1": f"{box[0]:.2f}", "y1": f"{box[1]:.2f}",
            "x2": f"{box[2]:.2f}", "y2": f"{box[3]:.2f}", "h": "1.5", "w": "1.6", "l": "3.9", "x": "1",
            "y": "1", "z": "10", "rotation_y": "0.1"}
    vals.update(fields)
    return " ".join([typ, *vals.values()] + ([score] if score is not None else []))


def make_root(tmp_path: Path, frames: dict[str, list[str]], splits: dict[str, list[str]] | None = None) -> Path:
    """A tiny KITTI root: 40x120 PNGs (distinct grey per frame) and label files."""
    root = tmp_path / "kitti"
    (root / "training" / "image_2").mkdir(parents=True)
    (root / "training" / "label_2").mkdir(parents=True)
    for fid, lines in frames.items():
        img = np.full((40, 120, 3), 10 + 10 * int(fid), np.uint8)
        cv2.imwrite(str(root / "training" / "image_2" / f"{fid}.png"), img)
        (root / "training" / "label_2" / f"{fid}.txt").write_text("".join(x + "\n" for x in lines))
    for name, ids in (splits or {}).items():
        (root / "ImageSets").mkdir(exist_ok=True)
        (root / "ImageSets" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    return root


def image_path(root: Path, fid: str) -> Path:
    return root / "training" / "image_2" / f"{fid}.png"


def corrupt_pixels(path: Path) -> None:
    """Damage the compressed pixel data: the header and the end chunk stay valid (CRC error)."""
    b = bytearray(path.read_bytes())
    i = b.index(b"IDAT") + 8
    b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def caught(fn):
    """(result, [warning messages of KittiDataWarning]) of fn()."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in ws if issubclass(w.category, KittiDataWarning)]


# ----------------------------------------------------------------------------- (7) labels
def test_utf8_bom_is_stripped_from_the_first_type(tmp_path):
    # repro: a label file saved "UTF-8 with BOM" turned the first type into '\ufeffPedestrian'
    root = make_root(tmp_path, {"000000": [line("Car")]}, splits={"train": ["000000"]})
    p = root / "training" / "label_2" / "000000.txt"
    p.write_bytes(b"\xef\xbb\xbf" + (line("Pedestrian", (50, 5, 60, 35)) + "\n" + line("Car") + "\n").encode())
    lab = read_label_file(p, with_score=False)
    assert lab.types.tolist() == ["Pedestrian", "Car"]
    assert parse_label_lines(["\ufeff" + line("Cyclist")]).types.tolist() == ["Cyclist"]
    (root / "ImageSets" / "train.txt").write_bytes(b"\xef\xbb\xbf000000\n")
    assert read_split(root / "ImageSets" / "train.txt") == ["000000"]
    ds, msgs = caught(lambda: KittiDataset(root, "train"))
    assert not ds.unknown_types and not msgs
    assert ds[0]["labels"].tolist() == [1, 0]  # Pedestrian kept, not dropped


def test_unknown_and_wrong_case_types_one_warning_per_split(tmp_path):
    # repro: 'car' and 'Bus' were dropped without a word
    frames = {"000000": [line("car"), line("Bus"), line("Car")],
              "000001": [line("car"), line("DontCare")],
              "000002": [line("Car")]}
    root = make_root(tmp_path, frames, splits={"train": ["000000", "000001"], "val": ["000002"]})
    (tr, va), msgs = caught(lambda: build_datasets(DataConfig(root=str(root), input_size=SIZE)))
    assert tr.unknown_types == {"car": 2, "Bus": 1} and not va.unknown_types
    assert len(msgs) == 1, msgs  # one warning for the folder's split, not one per file
    msg = msgs[0]
    assert "train.txt" in msg and "2 frames" in msg and "3 object(s) of unknown type ignored" in msg
    assert "'car' x2 (did you mean 'Car'? type names are case-sensitive)" in msg
    assert "'Bus' x1" in msg and "did you mean" not in msg.split("'Bus' x1")[1].split(";")[0]
    assert "Car, Van, Truck, Pedestrian, Person_sitting, Cyclist, Tram, Misc, DontCare" in msg
    # the same split read again in the same run (student after teacher, evaluation): no repeat
    _, again = caught(lambda: build_datasets(DataConfig(root=str(root), input_size=SIZE)))
    assert again == []


@pytest.mark.parametrize("field,token", [("x1", "inf"), ("y2", "-inf"), ("truncated", "nan"),
                                         ("z", "Infinity"), ("alpha", "1e400")])
def test_non_finite_values_refused_with_file_line_field(tmp_path, field, token):
    # repro: 'inf' coordinates were accepted while 'nan' was refused
    root = make_root(tmp_path, {"000000": [line("Car"), line("Car", **{field: token})]})
    with pytest.raises(KittiFormatError,
                       match=rf"000000\.txt:2: field '{field}': expected a finite number, found '{token}'"):
        KittiDataset(root, None)
    with pytest.raises(KittiFormatError, match=rf"000000\.txt:2: field '{field}'"):
        read_label_file(root / "training" / "label_2" / "000000.txt")


@pytest.mark.parametrize("score", ["inf", "-inf", "nan"])
def test_result_score_must_be_finite(tmp_path, score):
    p = tmp_path / "000007.txt"
    p.write_text(line("Car", score="0.5") + "\n" + line("Car", score=score) + "\n")
    with pytest.raises(KittiFormatError, match=rf"000007\.txt:2: field 'score': expected a finite number, "
                                               rf"found '{score}'"):
        read_label_file(p, with_score=True)


def test_inverted_boxes_refused_for_training_kept_for_devkit_evaluation(tmp_path):
    # repro: x2 < x1 boxes were dropped without a word
    bad = line("Car", (30, 5, 10, 25))  # x2 < x1
    root = make_root(tmp_path, {"000000": [line("Car"), bad]})
    with pytest.raises(KittiFormatError, match=r"000000\.txt:2: negative-size box x1 y1 x2 y2 = "
                                               r"30\.00 5\.00 10\.00 25\.00 \(expected x2 >= x1 and y2 >= y1\)"):
        KittiDataset(root, None)
    with pytest.raises(KittiFormatError, match=r"000000\.txt:2: negative-size box"):
        read_label_file(root / "training" / "label_2" / "000000.txt", strict_boxes=True)
    # ground truth for the devkit evaluator: read as the devkit reads it ...
    assert len(read_label_file(root / "training" / "label_2" / "000000.txt", with_score=False)) == 2
    # ... and scored as the devkit scores it: a y-inverted car (negative height) is ignored,
    # an x-inverted one of valid height is a valid car that nothing overlaps (missed)
    gt, det = tmp_path / "gt", tmp_path / "det"
    gt.mkdir()
    det.mkdir()
    (gt / "000000.txt").write_text("\n".join([line("Car", (10, 10, 100, 100)), line("Car", (200, 100, 300, 10)),
                                              line("Car", (500, 10, 400, 100))]) + "\n")
    (det / "000000.txt").write_text(line("Car", (10, 10, 100, 100), score="0.9") + "\n")
    assert evaluate_kitti_dirs(gt, det, classes=("Car",)).num_gt["Car"] == (2, 2, 2)
    # result files: refused, as the evaluator refuses negative-size detections
    (det / "000000.txt").write_text(line("Car", (10, 100, 100, 10), score="0.9") + "\n")
    with pytest.raises(KittiFormatError, match=r"000000\.txt:1: negative-size box"):
        read_label_file(det / "000000.txt", with_score=True)


def test_zero_area_boxes_dropped_with_one_warning(tmp_path):
    root = make_root(tmp_path, {"000000": [line("Car"), line("Car", (10, 5, 10, 25))],
                                "000001": [line("Cyclist", (10, 5, 30, 5))]})
    ds, msgs = caught(lambda: KittiDataset(root, None))
    assert ds.empty_boxes == 2 and ds[0]["labels"].tolist() == [0] and ds[1]["labels"].numel() == 0
    assert len(ds.frame_labels(0)) == 2  # the evaluation's ground truth keeps it, as the devkit does
    assert len(msgs) == 1 and "2 zero-area box(es)" in msgs[0] and "000000.txt" in msgs[0]


# ----------------------------------------------------------------------------- split files
def test_training_split_listing_a_frame_twice_is_refused(tmp_path, capsys):
    # repro: a train split listing a frame twice was accepted and training used the frame twice
    root = make_root(tmp_path, {"000000": [line("Car")], "000001": [line("Car")]},
                     splits={"train": ["000000", "000001"], "val": ["000001"]})
    split = root / "ImageSets" / "train.txt"
    split.write_text("000000\n\n000001\n000000\n")
    msg = f"{split}:4: frame id '000000' is listed twice (first on line 1)"  # real line numbers
    with pytest.raises(KittiFormatError) as err:
        read_split(split)
    assert str(err.value) == msg
    with pytest.raises(KittiFormatError) as err:
        KittiDataset(root, "train")
    assert str(err.value) == msg
    rc = load_tool("train").main([str(_config(tmp_path, root)), "--no-progress"])
    out = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in out and f"error: {msg}" in out
    assert not (tmp_path / "runs").exists()
    split.write_text("000001\n000000\n")  # each once, in any order: fine
    assert read_split(split) == ["000001", "000000"]


def test_split_errors_give_the_real_line_number(tmp_path):
    # the non-numeric-id error used to count only non-blank lines
    split = tmp_path / "s.txt"
    split.write_text("000000\n\n\n000001\nframe_2\n")
    with pytest.raises(KittiFormatError) as err:
        read_split(split)
    assert str(err.value) == f"{split}:5: expected a numeric frame id, found 'frame_2'"
    split.write_bytes(b"\xef\xbb\xbf000000\r\n\r\n\xc2\xb2\r\n")  # BOM, CRLF; a superscript digit
    with pytest.raises(KittiFormatError) as err:
        read_split(split)
    assert str(err.value) == f"{split}:3: expected a numeric frame id, found '\u00b2'"
    split.write_bytes(b"000000\n00000\xe9\n")
    with pytest.raises(KittiFormatError, match=r"s\.txt:2: not a UTF-8 text file"):
        read_split(split)


# ----------------------------------------------------------------------------- (12) garbage label file
def test_garbage_label_file_one_line_error_naming_file_and_line(tmp_path):
    # repro: a non-UTF-8 label file gave a UnicodeDecodeError without the file name
    root = make_root(tmp_path, {"000000": [line("Car")], "000001": [line("Car")]})
    p = root / "training" / "label_2" / "000001.txt"
    p.write_bytes((line("Car") + "\n").encode() + b"Car \xff\xfe\x00 garbage\n")
    with pytest.raises(KittiFormatError) as err:
        KittiDataset(root, None)
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"{p}:2: not a UTF-8 text file (byte 0xff at offset")
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")
    with pytest.raises(KittiFormatError, match=r"000001\.txt:1: not a UTF-8 text file \(byte 0x89 at offset 0\)"):
        read_label_file(p)


def test_train_cli_prints_label_errors_as_one_line(tmp_path, capsys):
    root = make_root(tmp_path, {"000000": [line("Car")], "000001": [line("Car")]},
                     splits={"train": ["000000"], "val": ["000001"]})
    (root / "training" / "label_2" / "000000.txt").write_bytes(b"\xff\xfe\x00garbage")
    rc = load_tool("train").main([str(_config(tmp_path, root)), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"error: {root / 'training' / 'label_2' / '000000.txt'}:1: not a UTF-8 text file" in err


# ----------------------------------------------------------------------------- (11) images: preflight
def _config(tmp_path: Path, root: Path, epochs: int = 1) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"""
name: tiny
device: cpu
output_dir: {tmp_path / 'runs'}
data: {{root: {root}, input_size: [{SIZE[0]}, {SIZE[1]}], batch_size: 2}}
teacher: {{family: darknet, cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}}}
train: {{epochs: {epochs}, lr: 0.001}}
""")
    return p


def test_preflight_names_every_bad_image(tmp_path):
    # repro: a corrupt or truncated image passed the preflight and crashed mid-epoch
    frames = {f"{i:06d}": [line("Car")] for i in range(6)}
    root = make_root(tmp_path, frames, splits={"train": ["000000", "000001", "000002"],
                                               "val": ["000003", "000004", "000005"]})
    cfg = ExperimentConfig(data=DataConfig(root=str(root), input_size=SIZE))
    assert check_dataset(cfg) == 6
    truncate(image_path(root, "000001"))                                     # cut short
    image_path(root, "000002").write_bytes(b"not an image at all")            # garbage header
    cv2.imwrite(str(image_path(root, "000004")), np.zeros((4, 4, 3), np.uint8))  # implausible size
    corrupt_pixels(image_path(root, "000005"))  # damaged pixel data: only a full decode finds it
    with pytest.raises(KittiDatasetError) as err:
        check_experiment(cfg)
    msg = str(err.value)
    assert msg.startswith(f"3 of 6 images of the train split 'train' and val split 'val' in {root} cannot be used")
    assert f"{image_path(root, '000001')}: truncated file: no PNG end chunk IEND at its end" in msg
    assert f"{image_path(root, '000002')}: not a readable image: cannot identify image file" in msg
    assert f"{image_path(root, '000004')}: implausible image size 4x4" in msg
    assert "000005" not in msg and check_image(image_path(root, "000005")) == (120, 40)
    # evaluation checks only what it reads
    with pytest.raises(KittiDatasetError, match=r"1 of 3 images of the val split"):
        check_dataset(cfg, splits=("val",))
    image_path(root, "000003").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 frame\(s\) without an image.*000003"):
        check_dataset(cfg, splits=("val",))


def test_train_cli_stops_on_bad_image_before_training(tmp_path, capsys):
    root = make_root(tmp_path, {"000000": [line("Car")], "000001": [line("Car")]},
                     splits={"train": ["000000"], "val": ["000001"]})
    truncate(image_path(root, "000001"))
    rc = load_tool("train").main([str(_config(tmp_path, root)), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and not (tmp_path / "runs").exists()
    assert f"{image_path(root, '000001')}: truncated file" in err and err.startswith("error: 1 of 2 images")


def test_preflight_time_is_header_only(tmp_path):
    """200 full-size PNGs: header + tail checks take far less than decoding them."""
    import time

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    img = np.repeat(rng.integers(0, 255, (375, 1, 3), dtype=np.uint8), 1242, axis=1)
    cv2.imwrite(str(d / "a.png"), img)
    data = (d / "a.png").read_bytes()
    paths = []
    for i in range(200):
        paths.append(d / f"{i:06d}.png")
        paths[-1].write_bytes(data)
    from kd_bnn.data import check_images

    t0 = time.perf_counter()
    assert check_images(paths) == 200
    t_check = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in paths[:20]:
        cv2.imread(str(p))
    t_decode = (time.perf_counter() - t0) * 10
    assert t_check < 2.0 and t_check < t_decode, (t_check, t_decode)


# ----------------------------------------------------------------------------- (11) images: mid-run
def _two_epochs(loader) -> list[list[torch.Tensor]]:
    out = []
    for _ in range(2):
        out.append([torch.cat([b.images.flatten(), b.targets.flatten()]) for b in loader])
    return out


def test_corrupt_image_mid_run_is_skipped_deterministically_with_one_warning(tmp_path):
    # repro: truncated data after a valid header crashed the epoch with a traceback
    frames = {f"{i:06d}": [line("Car", (10 + i, 5, 30 + i, 25))] for i in range(5)}
    root = make_root(tmp_path, frames)
    corrupt_pixels(image_path(root, "000002"))
    ds = KittiDataset(root, None, transforms=eval_transforms(SIZE))
    s, msgs = caught(lambda: ds[2])
    assert s["meta"]["image_id"] == "000003" and s["meta"]["skipped"]["image_id"] == "000002"
    assert torch.equal(s["image"], ds[3]["image"]) and torch.equal(s["boxes"], ds[3]["boxes"])
    assert msgs == [f"{image_path(root, '000002')}: cannot decode image (corrupt or not an image); frame 000002 "
                    "skipped: its samples are replaced by the next readable frame of the split (fix or replace "
                    "the file)"]
    # the last frame wraps around to the first; a file cut short after the preflight is skipped too
    truncate(image_path(root, "000004"))
    s, msgs = caught(lambda: ds[4])
    assert s["meta"]["image_id"] == "000000"
    assert msgs == [f"{image_path(root, '000004')}: truncated file: no PNG end chunk IEND at its end; "
                    "frame 000004 skipped: its samples are replaced by the next readable frame of the split "
                    "(fix or replace the file)"]

    def run():
        d = KittiDataset(root, None, transforms=train_transforms(SIZE, seed=0))
        return _two_epochs(build_loader(d, 2, shuffle=True, workers=0, seed=3))

    (a, msgs) = caught(run)
    assert msgs == []  # already reported in this run: once per file
    b = run()
    assert all(torch.equal(x, y) for ea, eb in zip(a, b) for x, y in zip(ea, eb))  # seeded runs stay equal


def test_corrupt_image_with_worker_processes_reported_once_from_main(tmp_path):
    frames = {f"{i:06d}": [line("Car")] for i in range(4)}
    root = make_root(tmp_path, frames)
    corrupt_pixels(image_path(root, "000001"))
    ds = KittiDataset(root, None, transforms=train_transforms(SIZE, seed=0))
    loader = build_loader(ds, 2, shuffle=True, workers=1, seed=0)
    epochs, msgs = caught(lambda: _two_epochs(loader))
    assert [len(e) for e in epochs] == [2, 2]  # no lost epoch
    assert len(msgs) == 1 and f"{image_path(root, '000001')}: cannot decode image" in msgs[0]
    assert ds.bad_images.keys() == {1}  # the main process knows: later epochs' workers skip it at once


def test_validation_pass_warns_with_the_count_of_skipped_frames(tmp_path):
    # repro: a corrupt validation image crashed after the epoch and lost it
    frames = {f"{i:06d}": [line("Car")] for i in range(5)}
    root = make_root(tmp_path, frames, splits={"val": list(frames)})
    for fid in ("000001", "000003"):
        corrupt_pixels(image_path(root, fid))
    ds = KittiDataset(root, "val", transforms=eval_transforms(SIZE))
    loader = build_loader(ds, 2, shuffle=False, workers=0)
    ids, msgs = caught(lambda: [m["image_id"] for b in loader for m in b.meta])
    assert ids == ["000000", "000002", "000002", "000004", "000004"]
    assert len(msgs) == 3, msgs  # one per file, then the count for the pass
    assert msgs[2].startswith("evaluation pass: 2 of 5 frames skipped because their image cannot be decoded "
                              "(000001, 000003): they have no predictions of their own")
    _, again = caught(lambda: list(loader))
    assert again == []  # the same frames skipped again: already reported


def test_every_image_unreadable_is_a_clear_error(tmp_path):
    root = make_root(tmp_path, {"000000": [line("Car")], "000001": [line("Car")]})
    for fid in ("000000", "000001"):
        corrupt_pixels(image_path(root, fid))
    ds = KittiDataset(root, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KittiDataWarning)
        with pytest.raises(KittiDatasetError, match=r"none of the 2 images of this split can be decoded"):
            ds[0]


def test_training_run_survives_corrupt_images(tmp_path, capsys):
    """End to end: a train and a val image that pass the preflight but cannot be decoded."""
    frames = {f"{i:06d}": [line("Car", (10, 5, 60, 35))] for i in range(4)}
    root = make_root(tmp_path, frames, splits={"train": ["000000", "000001"], "val": ["000002", "000003"]})
    corrupt_pixels(image_path(root, "000001"))
    corrupt_pixels(image_path(root, "000003"))
    rc, msgs = caught(lambda: load_tool("train").main([str(_config(tmp_path, root)), "--no-progress"]))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (tmp_path / "runs" / "tiny" / "last.pt").is_file()
    assert any(f"{image_path(root, '000001')}: cannot decode image" in m for m in msgs)
    assert any(m.startswith("evaluation pass: 1 of 2 frames skipped") for m in msgs), msgs
