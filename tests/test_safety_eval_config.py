"""Safety regressions: tools/eval.py never writes into a dataset folder or over foreign files,
refuses duplicated split ids and silently empty predictions; config values are range-checked
before any work; atomic writes give new files the user's umask."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
from toolload import load_tool

from kd_bnn.config import ConfigError, ExperimentConfig, load_config
from kd_bnn.eval.kitti import (
    RESULT_MARKER,
    EmptyResultsError,
    ResultDirError,
    check_result_dir,
    evaluate_kitti_dirs,
)
from kd_bnn.io import atomic_save, atomic_write_bytes, atomic_write_text, current_umask

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Car", "Pedestrian", "Cyclist"]
CAR = "Car 0.00 0 -10 {x1} 100.00 {x2} 200.00 1.5 1.6 3.9 1.0 1.5 20.0 0.0"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from kd_bnn.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 4, seed=0, size=(320, 96), val_fraction=0.5)
    return root


@pytest.fixture(scope="module")
def teacher_run(synth, tmp_path_factory) -> tuple[Path, Path]:
    """(config, checkpoint) of a tiny teacher-only experiment on `synth`."""
    torch = pytest.importorskip("torch")
    from kd_bnn.engine.build import build_model
    from kd_bnn.engine.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("run")
    cfg_path = d / "t.yaml"
    cfg_path.write_text(f"""
name: tiny
device: cpu
output_dir: {d / 'runs'}
data: {{root: {synth}, input_size: [64, 192], batch_size: 2}}
teacher: {{family: darknet, cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}}}
eval: {{conf_thres: 0.001}}
""")
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = build_model(cfg.teacher, CLASSES, (64, 192), load_weights=False)
    ckpt = save_checkpoint(d / "best.pt", {"model": model.state_dict(), "class_names": CLASSES})
    return cfg_path, ckpt


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _eval_model(teacher_run, *extra: str) -> list[str]:
    cfg_path, ckpt = teacher_run
    return ["--config", str(cfg_path), "--weights", str(ckpt), "--no-progress", "--no-coco", *extra]


def _write_frames(folder: Path, frames: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for fid, lines in frames.items():
        (folder / f"{fid}.txt").write_text("".join(x + "\n" for x in lines))


def _gt_and_perfect_preds(tmp_path: Path) -> tuple[Path, Path]:
    """Three frames: 000000 has two cars, the others one; predictions find only frame 000000's."""
    cars = {"000000": [CAR.format(x1="100.00", x2="200.00"), CAR.format(x1="400.00", x2="500.00")],
            "000001": [CAR.format(x1="100.00", x2="200.00")], "000002": [CAR.format(x1="300.00", x2="400.00")]}
    _write_frames(tmp_path / "gt", cars)
    _write_frames(tmp_path / "det", {"000000": [x + " 0.9" for x in cars["000000"]], "000001": [], "000002": []})
    return tmp_path / "gt", tmp_path / "det"


# ----------------------------------------------------------------------------- (3) --out
def test_out_at_the_label_folder_is_refused_and_labels_survive(synth, teacher_run, capsys):
    """The report: ``--out <data.root>/training/label_2`` emptied every val label file, rc 0."""
    label_dir = synth / "training" / "label_2"
    before = _snapshot(label_dir)
    rc = load_tool("eval").main(_eval_model(teacher_run, "--out", str(label_dir)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"refusing to write result files into {label_dir}: it is the ground-truth label folder" in err
    assert _snapshot(label_dir) == before and not (label_dir / RESULT_MARKER).exists()


@pytest.mark.parametrize("where", ["label_inside", "image", "image_inside", "calib", "dotdot", "symlink"])
def test_out_in_or_through_a_dataset_folder_is_refused(synth, teacher_run, tmp_path, capsys, where):
    training = synth / "training"
    label_dir = training / "label_2"
    out = {"label_inside": label_dir / "results", "image": training / "image_2",
           "image_inside": training / "image_2" / "x", "calib": training / "calib",
           "dotdot": training / "image_2" / ".." / "label_2", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(label_dir, target_is_directory=True)
    before = {d: _snapshot(training / d) for d in ("label_2", "image_2")}
    rc = load_tool("eval").main(_eval_model(teacher_run, "--out", str(out)))
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to write result files into" in err and str(out) in err, err
    assert ("is inside the" if "inside" in where else "it is the") in err
    assert {d: _snapshot(training / d) for d in ("label_2", "image_2")} == before
    assert not (label_dir / "results").exists() and not (training / "image_2" / "x").exists()


def test_out_holding_foreign_files_is_refused(synth, teacher_run, tmp_path, capsys):
    """A copy of the ground truth elsewhere (no marker) is never mistaken for earlier results."""
    copy = tmp_path / "labels_copy"
    shutil.copytree(synth / "training" / "label_2", copy)
    before = _snapshot(copy)
    rc = load_tool("eval").main(_eval_model(teacher_run, "--out", str(copy)))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"refusing to write result files into {copy}: it holds 4 entries and no {RESULT_MARKER} marker" in err
    assert "000000.txt, 000001.txt, 000002.txt" in err and "choose a new or empty folder" in err
    assert _snapshot(copy) == before
    # a marked folder with something kd_bnn does not write there
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / RESULT_MARKER).write_text("x\n")
    (marked / "000001.txt").write_text("")
    (marked / "notes.md").write_text("mine\n")
    rc = load_tool("eval").main(_eval_model(teacher_run, "--out", str(marked)))
    err = capsys.readouterr().err
    assert rc == 2 and f"{marked}: it holds 1 entry that kd_bnn does not write there (notes.md)" in err
    assert (marked / "notes.md").read_text() == "mine\n"


def test_out_new_empty_or_own_earlier_output_is_fine(synth, teacher_run, tmp_path, capsys):
    cli = load_tool("eval")
    out = tmp_path / "eval"
    assert cli.main(_eval_model(teacher_run, "--out", str(out))) == 0, capsys.readouterr().err
    assert (out / RESULT_MARKER).is_file() and len(list(out.glob("*.txt"))) == 2
    capsys.readouterr()
    assert cli.main(_eval_model(teacher_run, "--out", str(out))) == 0, capsys.readouterr().err  # rerun
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(_eval_model(teacher_run, "--out", str(empty))) == 0, capsys.readouterr().err
    # a run that fails before writing leaves no new folder behind
    cfg_path, _ = teacher_run
    gone = tmp_path / "gone"
    rc = cli.main(["--config", str(cfg_path), "--weights", str(tmp_path / "none.pt"), "--out", str(gone)])
    assert rc == 2 and "none.pt" in capsys.readouterr().err and not gone.exists()


def test_json_and_plots_never_go_into_the_label_folder(synth, teacher_run, tmp_path, capsys):
    label_dir = synth / "training" / "label_2"
    before = _snapshot(label_dir)
    rc = load_tool("eval").main(_eval_model(teacher_run, "--out", str(tmp_path / "e"),
                                            "--json", str(label_dir / "000001.txt")))
    err = capsys.readouterr().err
    assert rc == 2 and f"refusing to write --json {label_dir / '000001.txt'}: it is inside the ground-truth" in err
    gt, det = _gt_and_perfect_preds(tmp_path)
    rc = load_tool("eval").main(["--gt-dir", str(gt), "--pred-dir", str(det), "--plots", str(gt)])
    assert rc == 2 and "refusing to write --plots" in capsys.readouterr().err
    assert _snapshot(label_dir) == before


def test_check_result_dir_teacher_subfolder(tmp_path):
    out = tmp_path / "o"
    (out / "teacher").mkdir(parents=True)
    (out / RESULT_MARKER).write_text("x\n")
    (out / "teacher" / "000001.txt").write_text("")
    (out / ".000002.txt.abc.tmp").write_text("")
    check_result_dir(out)  # own output: results, teacher results, a leftover temporary
    (out / "teacher" / "best.pt").write_text("")
    with pytest.raises(ResultDirError, match=r"teacher/best\.pt"):
        check_result_dir(out)
    with pytest.raises(ResultDirError, match="not a folder"):
        check_result_dir(out / RESULT_MARKER)


# ----------------------------------------------------------------------------- (8) split, pred dir
def test_duplicated_split_id_is_refused(tmp_path, capsys):
    """The report: a split listing a frame twice counts it twice and changes the AP."""
    gt, det = _gt_and_perfect_preds(tmp_path)
    split = tmp_path / "val.txt"
    split.write_text("000000\n000001\n000000\n000002\n")
    rc = load_tool("eval").main(["--gt-dir", str(gt), "--pred-dir", str(det), "--split", str(split)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{split}:3: frame id '000000' is listed twice (first on line 1)" in err
    with pytest.raises(ValueError, match="'000001' is listed twice"):
        evaluate_kitti_dirs(gt, det, ["000000", "000001", "000001"])
    split.write_bytes("\ufeff000000\n000000\n".encode())  # a byte-order mark hides nothing
    rc = load_tool("eval").main(["--gt-dir", str(gt), "--pred-dir", str(det), "--split", str(split)])
    assert rc == 2 and f"{split}:2: frame id '000000' is listed twice (first on line 1)" in capsys.readouterr().err
    split.write_text("000000\n\n000001\n000002\n")  # blank lines are fine
    assert load_tool("eval").main(["--gt-dir", str(gt), "--pred-dir", str(det), "--split", str(split)]) == 0


def test_duplicated_split_id_real_kitti(shared_kitti, tmp_path, capsys):
    label_dir = shared_kitti / "labels_trainval" / "label_2"
    ids = (shared_kitti / "ImageSets" / "val.txt").read_text().split()[:3]
    det = tmp_path / "det"
    det.mkdir()
    for fid in ids:  # the ground truth as detections (score 1)
        lines = [ln + " 1.0\n" for ln in (label_dir / f"{fid}.txt").read_text().splitlines() if ln.strip()]
        (det / f"{fid}.txt").write_text("".join(lines))
    split = tmp_path / "val.txt"
    split.write_text("\n".join([*ids, ids[1]]) + "\n")
    rc = load_tool("eval").main(["--gt-dir", str(label_dir), "--pred-dir", str(det), "--split", str(split)])
    assert rc == 2 and f"{split}:4: frame id '{ids[1]}' is listed twice (first on line 2)" in capsys.readouterr().err


def test_duplicated_val_split_in_model_mode_fails_before_work(synth, teacher_run, tmp_path, capsys):
    split = tmp_path / "val_dup.txt"
    ids = (synth / "ImageSets" / "val.txt").read_text().split()
    split.write_text("\n".join([*ids, ids[0]]) + "\n")
    out = tmp_path / "e"
    rc = load_tool("eval").main(_eval_model(teacher_run, "--out", str(out), f"data.val_split={split}"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{split}:{len(ids) + 1}: frame id '{ids[0]}' is listed twice" in err
    assert not out.exists()


def test_model_mode_preflights_only_the_val_images(synth, teacher_run, tmp_path, capsys):
    # evaluating reads only the val split: a bad training image must not stop it
    from kd_bnn.data.dataset import KittiDatasetError
    from kd_bnn.engine.evaluate import val_dataset
    from kd_bnn.engine.preflight import check_dataset

    root = tmp_path / "data"
    shutil.copytree(synth, root)
    bad = root / "training" / "image_2" / f"{(root / 'ImageSets' / 'train.txt').read_text().split()[0]}.png"
    bad.write_bytes(bad.read_bytes()[:100])  # cut short
    cfg = load_config(teacher_run[0], [f"data.root={root}"])
    with pytest.raises(KittiDatasetError, match="train split"):
        check_dataset(cfg)  # training still refuses it
    assert len(val_dataset(cfg)) == 2
    out = tmp_path / "e"
    rc = load_tool("eval").main(_eval_model(teacher_run, "--out", str(out), f"data.root={root}"))
    assert rc == 0, capsys.readouterr().err
    assert len(list(out.glob("*.txt"))) == 2
    bad_val = root / "training" / "image_2" / f"{(root / 'ImageSets' / 'val.txt').read_text().split()[0]}.png"
    bad_val.write_bytes(b"not an image")
    with pytest.raises(KittiDatasetError, match=r"1 of 2 images of the val split"):
        val_dataset(cfg)


@pytest.mark.parametrize("kind", ["missing", "empty", "no_matching_file"])
def test_missing_or_empty_pred_dir_is_an_error_unless_allowed(tmp_path, capsys, kind):
    """The report: a missing or empty --pred-dir printed a warning and exited 0 with all AP 0."""
    gt, _ = _gt_and_perfect_preds(tmp_path)
    pred = tmp_path / "preds"
    if kind != "missing":
        pred.mkdir()
    if kind == "no_matching_file":
        (pred / "999999.txt").write_text("")
    cli = load_tool("eval")
    rc = cli.main(["--gt-dir", str(gt), "--pred-dir", str(pred), "--coco"])
    err = capsys.readouterr().err
    assert rc == 2 and f"result folder {pred}" in err and "--allow-empty-pred" in err
    assert ("does not exist" if kind == "missing" else "holds no result file for any of the 3") in err
    js = tmp_path / "o.json"
    rc = cli.main(["--gt-dir", str(gt), "--pred-dir", str(pred), "--allow-empty-pred", "--json", str(js)])
    printed = capsys.readouterr()
    assert rc == 0 and "3 of 3 result files missing" in printed.err
    assert json.loads(js.read_text())["bbox_2d"]["Car"]["R40"]["easy"] == 0.0
    with pytest.raises(EmptyResultsError):
        evaluate_kitti_dirs(gt, pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert evaluate_kitti_dirs(gt, pred, allow_empty=True).missing_results == 3


def test_pred_dir_or_gt_dir_that_is_a_file(tmp_path, capsys):
    gt, det = _gt_and_perfect_preds(tmp_path)
    for flags in ([], ["--allow-empty-pred"]):
        rc = load_tool("eval").main(["--gt-dir", str(gt), "--pred-dir", str(det / "000000.txt"), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and f"result folder {det / '000000.txt'} is a file, not a folder" in err, err
    split = tmp_path / "s.txt"
    split.write_text("000000\n")
    rc = load_tool("eval").main(["--gt-dir", str(gt / "000000.txt"), "--pred-dir", str(det), "--split", str(split)])
    err = capsys.readouterr().err
    assert rc == 2 and "1 label file(s) missing" in err and "Traceback" not in err


def test_pred_dir_with_some_results_still_warns(tmp_path, capsys):
    gt, det = _gt_and_perfect_preds(tmp_path)
    (det / "000002.txt").unlink()
    rc = load_tool("eval").main(["--gt-dir", str(gt), "--pred-dir", str(det)])
    assert rc == 0 and "1 of 3 result files missing" in capsys.readouterr().err


# ----------------------------------------------------------------------------- (9) config ranges
def test_negative_epochs_refused_with_key_constraint_and_value():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["train.epochs=-3"])
    assert "key 'train.epochs': Input should be greater than or equal to 1 (found -3)" in str(ei.value)


def test_bad_lr_refused_by_train_cli_before_any_work(tmp_path, capsys):
    """The report: ``train.lr=-1`` was refused only after the whole teacher phase."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: tiny
device: cpu
output_dir: {tmp_path / 'runs'}
data: {{root: {tmp_path / 'nowhere'}, input_size: [64, 192], batch_size: 2}}
teacher: {{family: darknet, cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}}}
teacher_train: {{epochs: 1}}
student: {{binary: {{mode: bwn}}}}
""")
    for bad, msg in (("train.lr=-1", "key 'train.lr': Input should be greater than 0 (found -1)"),
                     ("train.epochs=-3", "key 'train.epochs': Input should be greater than or equal to 1")):
        rc = load_tool("train").main([str(cfg), bad, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,key,constraint", [
    ("train.epochs=0", "train.epochs", "greater than or equal to 1"),
    ("teacher_train={epochs: 0}", "teacher_train.epochs", "greater than or equal to 1"),
    ("train.lr=0", "train.lr", "greater than 0"),
    ("train.momentum=1", "train.momentum", "less than 1"),
    ("train.momentum=-0.1", "train.momentum", "greater than or equal to 0"),
    ("train.weight_decay=-1e-4", "train.weight_decay", "greater than or equal to 0"),
    ("train.warmup_epochs=-1", "train.warmup_epochs", "greater than or equal to 0"),
    ("train.step_gamma=0", "train.step_gamma", "greater than 0"),
    ("train.step_gamma=1.5", "train.step_gamma", "less than or equal to 1"),
    ("train.step_milestones=[10, -1]", "train.step_milestones.1", "greater than or equal to 0"),
    ("train.grad_clip=0", "train.grad_clip", "greater than 0"),
    ("train.ema_decay=1", "train.ema_decay", "less than 1"),
    ("train.ema_decay=0", "train.ema_decay", "greater than 0"),
    ("train.eval_interval=0", "train.eval_interval", "greater than or equal to 1"),
    ("train.save_interval=0", "train.save_interval", "greater than or equal to 1"),
    ("train.lr=.nan", "train.lr", "finite number"),
    ("data.batch_size=0", "data.batch_size", "greater than or equal to 1"),
    ("data.workers=-1", "data.workers", "greater than or equal to 0"),
    ("data.input_size=[0, 640]", "data.input_size.0", "greater than or equal to 1"),
    ("data.input_size=[192, -640]", "data.input_size.1", "greater than or equal to 1"),
    ("data.max_images=0", "data.max_images", "greater than or equal to 1"),
    ("data.classes=[]", "data.classes", "at least 1 item"),
    ("data.augment.hflip=1.5", "data.augment.hflip", "less than or equal to 1"),
    ("data.augment.crop=-0.1", "data.augment.crop", "greater than or equal to 0"),
    ("data.augment.hsv=-0.2", "data.augment.hsv", "greater than or equal to 0"),
    ("data.augment.scale=[0, 1.2]", "data.augment.scale.0", "greater than 0"),
    ("data.augment.scale=[1.2, 0.8]", "data.augment.scale", "lo <= hi"),
    ("data.synthetic={num: 0}", "data.synthetic.num", "greater than or equal to 1"),
    ("data.synthetic={val_fraction: 1.0}", "data.synthetic.val_fraction", "less than 1"),
    ("data.synthetic={val_fraction: 0}", "data.synthetic.val_fraction", "greater than 0"),
    ("data.synthetic={size: [0, 375]}", "data.synthetic.size.0", "greater than or equal to 1"),
    ("eval.conf_thres=1.5", "eval.conf_thres", "less than or equal to 1"),
    ("eval.iou_thres=-0.1", "eval.iou_thres", "greater than or equal to 0"),
    ("eval.max_det=0", "eval.max_det", "greater than or equal to 1"),
    ("student={binary: {clip: 0}}", "student.binary.clip", "greater than 0"),
    ("student={binary: {pad_value: 0}}", "student.binary.pad_value", "must be +1 or -1"),
    ("student={binary: {stages: [{layers: ['*'], epoch: -1}]}}", "student.binary.stages.0.epoch",
     "greater than or equal to 0"),
    ("distill={terms: [{loss: mimic_l2, weight: -1}]}", "distill.terms.0.weight", "greater than or equal to 0"),
    ("seed=-1", "seed", "greater than or equal to 0"),
])
def test_out_of_range_values_are_refused(override, key, constraint):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    msg = str(ei.value)
    assert f"key '{key}': " in msg and constraint in msg and "(found " in msg, msg


def test_boundary_and_shipped_values_still_validate():
    cfg = load_config(None, ["train.epochs=1", "train.momentum=0", "train.weight_decay=0", "train.warmup_epochs=0",
                             "train.step_gamma=1", "train.grad_clip=null", "data.workers=0", "eval.conf_thres=0",
                             "eval.iou_thres=1", "data.augment.hflip=0", "data.augment.crop=1",
                             "data.augment.scale=[1, 1]", "data.max_images=1", "distill={terms: [{weight: 0}]}",
                             "student={binary: {pad_value: 1}}"])
    assert cfg.train.grad_clip is None and cfg.data.augment.scale == (1.0, 1.0)
    assert ExperimentConfig().exist_ok is False
    for path in sorted((REPO / "configs").rglob("*.yaml")):  # every shipped config (see also test_configs.py)
        load_config(path)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "..", ".", "/abs", "a\\b", "C:", " "])
def test_name_must_be_one_folder_name(name):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [f"name={json.dumps(name)}"])
    msg = str(ei.value)
    assert "key 'name': expected a" in msg and f"(found {name!r})" in msg, msg


@pytest.mark.parametrize("name", ["demo_s1", "exp-2", "kitti_darknet_yolov2_bwn_kt", "run.v2"])
def test_ordinary_run_names_stay_valid(name):
    assert load_config(None, [f"name={name}", "exist_ok=true"]).name == name


# ----------------------------------------------------------------------------- (13) file modes
@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_gives_new_files_the_umask_mode(tmp_path, umask):
    """The report: files written through atomic_path were 0600 whatever the umask."""
    atomic_write_text(tmp_path / "a.txt", "x")
    assert _mode(tmp_path / "a.txt") == 0o644
    assert current_umask() == 0o022
    umask(0o077)
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    assert _mode(tmp_path / "b.bin") == 0o600
    umask(0o002)
    atomic_save(tmp_path / "c.bin", lambda p: p.write_bytes(b"y"))
    assert _mode(tmp_path / "c.bin") == 0o664


def test_atomic_write_keeps_a_replaced_files_mode(tmp_path, umask):
    p = tmp_path / "cfg.yaml"
    p.write_text("old")
    p.chmod(0o640)
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and _mode(p) == 0o640
    assert not [q for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
