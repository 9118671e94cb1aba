"""tools/train.py on bad input: one clean message (no traceback), before any training starts."""

from __future__ import annotations

from pathlib import Path

import torch
from tinyrun import tiny_config
from toolload import load_tool

from kd_bnn.config import config_to_dict, load_config
from kd_bnn.data.synthetic import generate
from kd_bnn.engine.checkpoint import save_checkpoint
from kd_bnn.engine.trainer import CHECKPOINT_FORMAT

REPO = Path(__file__).resolve().parents[1]


def _train_cli():
    return load_tool("train")


def test_missing_dataset_says_how_to_get_kitti(tmp_path, capsys):
    rc = _train_cli().main([str(tiny_config(tmp_path, tmp_path / "nowhere")), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "KITTI data not found" in err and "tools/make_synthetic.py" in err
    assert "Traceback" not in err


def test_teacher_weights_missing_or_for_other_classes(tmp_path, capsys):
    root = tmp_path / "synth"
    for d in ("image_2", "label_2"):
        (root / "training" / d).mkdir(parents=True)
    missing = tiny_config(tmp_path, root, "student: {binary: {mode: bwn}}")
    rc = _train_cli().main([str(missing), f"teacher.weights={tmp_path / 'none.pt'}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "none.pt does not exist" in err
    ckpt = save_checkpoint(tmp_path / "t.pt", {"model": {"w": torch.zeros(1)}, "class_names": ["Car", "Van"]})
    rc = _train_cli().main([str(missing), f"teacher.weights={ckpt}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "['Car', 'Van']" in err and "same classes" in err


def test_resume_with_a_different_config_lists_the_keys(tmp_path, capsys):
    root = tmp_path / "synth"
    generate(root, 2, seed=0, size=(320, 96), val_fraction=0.5)
    cfg_path = tiny_config(tmp_path, root)
    saved = load_config(cfg_path, ["train.lr=0.01", "data.batch_size=1"])
    run = tmp_path / "runs" / "tiny"
    save_checkpoint(run / "last.pt", {"format": CHECKPOINT_FORMAT, "model": {}, "config": config_to_dict(saved)})
    rc = _train_cli().main([str(cfg_path), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot resume" in err and "train.lr" in err and "data.batch_size" in err
    assert "Traceback" not in err
