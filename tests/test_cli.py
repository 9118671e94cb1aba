"""The ``kd-bnn`` command (kd_bnn.cli): help, the installed script, one model argument for
val / export / predict (a checkpoint with its stored config, or a .kdbnn), predict sources."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_bnn.cli import COMMANDS, main
from kd_bnn.config import config_to_dict, load_config
from kd_bnn.data.kitti import read_split
from kd_bnn.data.synthetic import generate
from kd_bnn.engine.build import build_model, build_student
from kd_bnn.engine.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Car", "Pedestrian", "Cyclist"]
REQUIRED = ("train", "val", "export", "predict", "benchmark", "demo")


# ----------------------------------------------------------------------------- help
def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert f"\n  {name} " in out, name
    assert main([]) == 2 and "usage: kd-bnn COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_subcommand_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert f"usage: kd-bnn {name}" in capsys.readouterr().out


def test_unknown_command_and_aliases(capsys):
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0 and "usage: kd-bnn val" in capsys.readouterr().out
    assert main(["infer", "--help"]) == 0 and "--source" in capsys.readouterr().out
    assert main(["val", "--no-such-flag"]) == 2


def test_installed_console_script():
    """``pip install -e .`` installs ``kd-bnn`` (pyproject [project.scripts]) beside the interpreter."""
    eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "kd-bnn"]
    assert eps and eps[0].value == "kd_bnn.cli:main", "reinstall: pip install -e '.[dev]'"
    script = Path(sys.executable).parent / "kd-bnn"
    assert script.is_file(), f"{script} missing: run pip install -e '.[dev]'"
    r = subprocess.run([str(script), "val", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "usage: kd-bnn val" in r.stdout and "--model" in r.stdout


GT = {"000000": ["Car 0.00 0 -1.57 100.00 150.00 220.00 230.00 1.5 1.6 3.9 1.0 1.5 20.0 -1.5"],
      "000001": ["Pedestrian 0.00 0 0.10 500.00 140.00 540.00 240.00 1.7 0.6 0.8 2.0 1.6 15.0 0.1"]}
PRED = {"000000": ["Car -1 -1 -10 102.00 151.00 218.00 232.00 -1 -1 -1 -1000 -1000 -1000 -10 0.9"],
        "000001": []}


def test_val_result_files_does_not_import_torch(tmp_path):
    gt, pred = tmp_path / "label_2", tmp_path / "results"
    for folder, frames in ((gt, GT), (pred, PRED)):
        folder.mkdir()
        for fid, lines in frames.items():
            (folder / f"{fid}.txt").write_text("".join(line + "\n" for line in lines))
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    r = subprocess.run([sys.executable, "-m", "kd_bnn.cli", "val", "--gt-dir", str(gt), "--pred-dir", str(pred),
                        "--json", str(tmp_path / "ap.json")], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "KITTI 2D bbox AP" in r.stdout and (tmp_path / "ap.json").is_file()
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "kd_bnn" in imported and not imported & {"torch", "matplotlib", "cv2"}


# ----------------------------------------------------------------------------- a tiny trained run
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A synthetic set, a student config and a student checkpoint storing that config (as the
    trainer writes it: ``config``, ``class_names``, ``input_size``, ``binary_convs``)."""
    tmp = tmp_path_factory.mktemp("cli")
    root = tmp / "synth"
    generate(root, 4, seed=0, size=(320, 96), val_fraction=0.5)
    cfg_path = tmp / "s.yaml"
    cfg_path.write_text(f"""
name: tiny
device: cpu
output_dir: {tmp / 'runs'}
data: {{root: {root}, input_size: [64, 192], batch_size: 2}}
teacher: {{family: darknet, cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}}}
student: {{binary: {{mode: bwn}}}}
eval: {{conf_thres: 0.001}}
""")
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, CLASSES, (64, 192), load_weights=False)
    student, _ = build_student(teacher, cfg)
    from kd_bnn.binary.layers import BinaryConv2d

    ckpt = save_checkpoint(tmp / "runs" / "tiny" / "best.pt", {
        "model": student.state_dict(), "class_names": CLASSES, "input_size": [64, 192],
        "config": config_to_dict(cfg), "binary_convs": sum(isinstance(m, BinaryConv2d) for m in student.modules())})
    tckpt = save_checkpoint(tmp / "runs" / "tiny" / "teacher" / "best.pt", {
        "model": teacher.state_dict(), "class_names": CLASSES, "input_size": [64, 192],
        "config": config_to_dict(cfg), "binary_convs": 0})
    return {"tmp": tmp, "root": root, "config": cfg_path, "ckpt": ckpt, "teacher": tckpt}


@pytest.fixture
def no_ext(monkeypatch):
    """The pure-torch kernels: these tests check the commands, not the C++ build."""
    monkeypatch.setenv("KDBNN_NO_EXT", "1")


def _export(run, out: Path, capsys) -> Path:
    assert main(["export", "--model", str(run["ckpt"]), "--out", str(out)]) == 0, capsys.readouterr().err
    return out


def test_export_w1a8_calibrates_on_images_and_runs(run, tmp_path, capsys, no_ext):
    from kd_bnn.deploy.format import load_container
    from kd_bnn.deploy.runtime import Runtime

    out = tmp_path / "w.kdbnn"
    images = run["root"] / "training" / "image_2"
    argv = ["export", "--model", str(run["ckpt"]), "--out", str(out), "--calibrate", str(images), "--act-bits", "8",
            "--calib-images", "3", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0, capsys.readouterr().err
    assert "run W1A8 (calibrated on 3 images)" in capsys.readouterr().out
    _, meta = load_container(out)
    assert meta["activations"]["calibration_images"] == 3
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["w1a8_convs"] == rep["num_binary_convs"] > 0
    raw = Runtime(out)(torch.rand(1, 3, 64, 192))
    assert all(torch.isfinite(r).all() for r in raw)


@pytest.mark.parametrize("extra,msg", [
    (["--act-bits", "8"], "needs --calibrate DIR"),
    (["--calibrate", "IMAGES"], "add --act-bits 8"),
    (["--calibrate", "NOWHERE", "--act-bits", "8"], "--calibrate: .*no such image"),
])
def test_export_w1a8_argument_errors(run, tmp_path, capsys, extra, msg):
    images = str(run["root"] / "training" / "image_2")
    extra = [images if a == "IMAGES" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in extra]
    out = tmp_path / "w.kdbnn"
    assert main(["export", "--model", str(run["ckpt"]), "--out", str(out), *extra]) == 2
    assert re.search(msg, capsys.readouterr().err)
    assert not out.exists()


def test_export_with_only_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "m.kdbnn"
    assert main(["export", "--model", str(run["ckpt"]), "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "stored config" in printed and "compression" in printed
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["checkpoint"] == str(run["ckpt"]) and rep["num_binary_convs"] > 0
    # model=PATH is the same; overrides apply on top of the stored config
    assert main(["export", f"model={run['ckpt']}", "--out", str(tmp_path / "b.kdbnn"),
                 "data.input_size=[96,320]"]) == 2
    assert "trained at input size [64, 192]" in capsys.readouterr().err
    # refused: two different models, a .kdbnn as the checkpoint, no model nor config
    with pytest.raises(SystemExit):
        from kd_bnn.cli.export import main as export_main

        export_main(["--model", str(run["ckpt"]), f"model={tmp_path / 'x.pt'}", "--out", str(out)])
    capsys.readouterr()
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "c.kdbnn")]) == 2
    assert "already a .kdbnn" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "d.kdbnn")]) == 2
    # a checkpoint without a stored config needs --config
    bare = save_checkpoint(tmp_path / "bare.pt", {"model": torch.load(run["ckpt"], weights_only=True)["model"]})
    assert main(["export", "--model", str(bare), "--out", str(tmp_path / "e.kdbnn")]) == 2
    assert "stores no experiment config" in capsys.readouterr().err
    assert main(["export", "--model", str(bare), "--config", str(run["config"]), "--out", str(tmp_path / "e.kdbnn"),
                 "data.input_size=[64,192]"]) == 0


def test_val_with_only_the_checkpoint(run, capsys):
    assert main(["val", "--model", str(run["ckpt"]), "--no-progress", "--no-coco"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "KITTI 2D bbox AP" in out and "teacher not evaluated" in out
    written = run["tmp"] / "runs" / "tiny" / "eval"
    assert sorted(p.stem for p in written.glob("*.txt")) == sorted(read_split(run["root"] / "ImageSets" / "val.txt"))
    # the teacher phase's checkpoint (float, the same stored config) is evaluated as the teacher
    assert main(["val", f"model={run['teacher']}", "--out", str(run["tmp"] / "teval"), "--no-progress",
                 "--no-coco", "data.batch_size=1"]) == 0
    assert "the run's teacher phase): using it as the teacher" in capsys.readouterr().out


def test_val_on_a_kdbnn_scores_the_packed_runtime(run, tmp_path, capsys, no_ext):
    model = _export(run, tmp_path / "m.kdbnn", capsys)
    capsys.readouterr()
    js = tmp_path / "ap.json"
    assert main(["val", "--model", str(model), "--config", str(run["config"]), "--out", str(tmp_path / "e"),
                 "--json", str(js), "--no-progress"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "packed runtime" in out and "backend: pure-torch fallback (KDBNN_NO_EXT is set)" in out
    assert "KITTI 2D bbox AP" in out and "bbox_2d" in json.loads(js.read_text())
    val_ids = read_split(run["root"] / "ImageSets" / "val.txt")
    assert sorted(p.stem for p in (tmp_path / "e").glob("*.txt")) == sorted(val_ids)
    # a .kdbnn is data: the checkpoint / config paths it records are a hint, never opened
    lost = tmp_path / "lost.kdbnn"
    assert main(["export", "--model", str(run["ckpt"]), "--out", str(lost)]) == 0
    capsys.readouterr()
    assert main(["val", "--model", str(lost), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "pass --config CONFIG" in err and "--model runs/<name>/best.pt" in err
    assert f"checkpoint {run['ckpt']}" in err  # named as a hint
    assert not (tmp_path / "g").exists()
    assert main(["val", "--model", str(lost), "--config", str(run["config"]), "--out", str(tmp_path / "g"),
                 "--no-coco", "--no-progress"]) == 0


# ----------------------------------------------------------------------------- predict
@pytest.fixture
def images(tmp_path) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    for sub, names in (("a", ["000000", "000001"]), ("b", ["000000"])):
        (tmp_path / sub).mkdir()
        for n in names:
            cv2.imwrite(str(tmp_path / sub / f"{n}.png"), rng.integers(0, 255, (96, 320, 3), dtype=np.uint8))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    return tmp_path


def test_predict_a_file_a_folder_and_a_glob(run, images, tmp_path, capsys, no_ext):
    model = _export(run, tmp_path / "m.kdbnn", capsys)
    capsys.readouterr()
    cases = [(images / "a" / "000001.png", ["000001"]), (images / "a", ["000000", "000001"]),
             (str(images / "*" / "000001.png"), ["000001"])]
    for i, (source, stems) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["predict", "--model", str(model), "--source", str(source), "--out", str(out),
                     "--conf", "0.01", "--json", str(out / "counts.json")]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert printed.startswith("backend: ") and f"{len(stems)} images" in printed
        assert sorted(p.stem for p in (out / "data").glob("*.txt")) == stems
        assert sorted(p.stem for p in (out / "images").glob("*.png")) == stems
        assert sorted(json.loads((out / "counts.json").read_text())["detections"]) == stems
    # --images (old name) and a checkpoint (torch model from its stored config)
    out = tmp_path / "ck"
    assert main(["predict", f"model={run['ckpt']}", "--images", str(images / "a"), "--out", str(out),
                 "--no-draw"]) == 0
    assert "backend: torch" in capsys.readouterr().out
    assert sorted(p.stem for p in (out / "data").glob("*.txt")) == ["000000", "000001"]
    assert main(["predict", "--model", str(run["teacher"]), "--source", str(images / "b"), "--out", str(out)]) == 0
    assert "using it as the teacher" in capsys.readouterr().out
    # two images of one name (their result files would collide), nothing matching, overrides on a .kdbnn
    assert main(["predict", "--model", str(model), "--source", str(images / "*" / "*.png"), "--out", str(out)]) == 2
    assert "same name '000000'" in capsys.readouterr().err
    assert main(["predict", "--model", str(model), "--source", str(images / "*.jpg"), "--out", str(out)]) == 2
    assert "matches no images" in capsys.readouterr().err
    assert main(["predict", "--model", str(model), "--source", str(images / "a"), "--out", str(out),
                 "eval.conf_thres=0.1"]) == 2


# ----------------------------------------------------------------------------- train
def test_train_delegates_and_spells_the_resume_command(run, tmp_path, capsys, monkeypatch):
    import kd_bnn.cli.train as train_cli
    from kd_bnn.engine.experiment import RunInterrupted

    rc = main(["train", str(run["config"]), f"data.root={tmp_path / 'nowhere'}", "--no-progress"])
    assert rc == 1 and "KITTI data not found" in capsys.readouterr().err

    def interrupted(cfg, resume=False, progress=None):
        raise RunInterrupted(tmp_path / "runs" / "tiny-2", "student", None, 1, 2)

    monkeypatch.setattr(train_cli, "train", interrupted)
    assert main(["train", str(run["config"]), "train.epochs=2", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"resume with: kd-bnn train {run['config']} train.epochs=2 name=tiny-2 --resume" in err


def test_an_untrusted_ultralytics_pt_is_one_error_line(run, tmp_path, capsys):
    """PermissionError (a .pt named without ``trust``) is a fixable error like the others."""
    pytest.importorskip("ultralytics")
    cfg = tmp_path / "u.yaml"
    cfg.write_text(f"""
name: u
device: cpu
output_dir: {tmp_path / 'runs'}
data: {{root: {run['root']}, input_size: [64, 192], batch_size: 2}}
teacher: {{family: ultralytics, cfg: {tmp_path / 'yolo.pt'}}}
student: {{binary: {{mode: bwn}}}}
train: {{epochs: 1}}
""")
    assert main(["export", "--config", str(cfg), "--out", str(tmp_path / "m.kdbnn")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert main(["train", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "refusing to load" in err and "Traceback" not in err


def test_shipped_configs_work_outside_the_checkout(tmp_path, monkeypatch):
    """`kd-bnn train demo` / `kitti/darknet_yolov2_bwn_kt` from any folder: configs and Darknet cfgs
    ship inside the package (and a config's `configs/darknet/X.cfg` finds the shipped cfg)."""
    from kd_bnn.config import ConfigError, load_config
    from kd_bnn.engine.build import build_model

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    for name in ("demo", "kitti/darknet_yolov2_bwn_kt", "configs/demo.yaml", "demo.yaml"):
        cfg = load_config(name, ["data.input_size=[64,192]"])
        model = build_model(cfg.teacher, cfg.data.classes, tuple(cfg.data.input_size), load_weights=False)
        assert model.input_size == (64, 192)
    with pytest.raises(ConfigError, match=r"nor is it a shipped config: .*demo.*kitti/darknet_yolov2_bwn_kt"):
        load_config("no_such_config")


def test_a_checkpoints_stored_config_never_grants_trust(tmp_path):
    """A checkpoint is data: its stored config saying teacher.trust: true does not let the toolkit
    unpickle the .pt it names; only the user's own override does."""
    import torch

    from kd_bnn.cli.common import config_for_model

    saved = {"teacher": {"family": "ultralytics", "weights": "evil.pt", "trust": True},
             "student": {"model": {"family": "ultralytics", "trust": True}}}
    ckpt = tmp_path / "c.pt"
    torch.save({"model": {}, "config": saved}, ckpt)
    cfg, _ = config_for_model(None, [], ckpt)
    assert cfg.teacher.trust is False and cfg.student.model.trust is False
    cfg, _ = config_for_model(None, ["teacher.trust=true"], ckpt)
    assert cfg.teacher.trust is True
