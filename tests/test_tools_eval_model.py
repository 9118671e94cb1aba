"""tools/eval.py model mode end to end on a tiny synthetic set: result files, tables, JSON, and
the bad-input paths (missing dataset, class mismatch, wrong checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from toolload import load_tool

from kd_bnn.config import load_config
from kd_bnn.data.kitti import read_split
from kd_bnn.data.synthetic import generate
from kd_bnn.engine.build import build_model, build_student
from kd_bnn.engine.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Car", "Pedestrian", "Cyclist"]


def _cli(name: str = "eval"):
    return load_tool(name)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, 4, seed=0, size=(320, 96), val_fraction=0.5)
    return root


def _write_config(path: Path, root: Path, student: bool, **extra: str) -> Path:
    text = f"""
name: tiny
device: cpu
output_dir: {path.parent / 'runs'}
data:
  root: {root}
  input_size: [64, 192]
  batch_size: 2
teacher:
  family: darknet
  cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}
eval:
  conf_thres: 0.001
"""
    if student:
        text += "student:\n  binary: {mode: bwn}\n"
    for k, v in extra.items():
        text += f"{k}: {v}\n"
    path.write_text(text)
    return path


def _save(path: Path, model, classes=CLASSES) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, {"model": model.state_dict(), "class_names": list(classes)})


def test_teacher_config_writes_result_files_and_matches_result_file_mode(synth, tmp_path, capsys):
    cfg_path = _write_config(tmp_path / "t.yaml", synth, student=False)
    cfg = load_config(cfg_path)
    teacher = build_model(cfg.teacher, CLASSES, (64, 192), load_weights=False)
    ckpt = _save(tmp_path / "best.pt", teacher)
    cli = _cli()
    out, js = tmp_path / "eval", tmp_path / "o.json"
    rc = cli.main(["--config", str(cfg_path), "--weights", str(ckpt), "--out", str(out), "--json", str(js),
                   "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    val_ids = read_split(synth / "ImageSets" / "val.txt")
    assert sorted(p.stem for p in out.glob("*.txt")) == sorted(val_ids)
    for p in out.glob("*.txt"):  # 2D result fields: 16 per line, 3D placeholders
        for line in p.read_text().splitlines():
            f = line.split()
            assert len(f) == 16 and f[0] in CLASSES and f[8:14] == ["-1", "-1", "-1", "-1000", "-1000", "-1000"]
    assert "KITTI 2D bbox AP" in printed.out and "COCO-style" in printed.out and "Compression" in printed.out
    report = json.loads(js.read_text())
    assert set(CLASSES) <= set(report["bbox_2d"]) and "coco" in report
    assert report["compression"]["compression"] == pytest.approx(1.0, abs=0.05)  # float: BN folding only
    assert report["num_frames"] == len(val_ids) and "teacher" not in report
    # the printed numbers are those of the result-file mode on the written files
    js2 = tmp_path / "files.json"
    rc = cli.main(["--gt-dir", str(synth / "training" / "label_2"), "--pred-dir", str(out),
                   "--split", str(synth / "ImageSets" / "val.txt"), "--json", str(js2), "--coco"])
    assert rc == 0
    files = json.loads(js2.read_text())
    assert files["bbox_2d"] == report["bbox_2d"] and files["coco"] == report["coco"]


def test_student_config_shows_teacher_side_by_side(synth, tmp_path, capsys):
    cfg_path = _write_config(tmp_path / "s.yaml", synth, student=True)
    cfg = load_config(cfg_path)
    teacher = build_model(cfg.teacher, CLASSES, (64, 192), load_weights=False)
    student, _ = build_student(teacher, cfg)
    t_ckpt, s_ckpt = _save(tmp_path / "teacher.pt", teacher), _save(tmp_path / "student.pt", student)
    out, js = tmp_path / "eval", tmp_path / "o.json"
    rc = _cli().main(["--config", str(cfg_path), "--weights", str(s_ckpt), "--teacher-weights", str(t_ckpt),
                      "--out", str(out), "--json", str(js), "--no-progress", "--no-coco", "eval.max_det=50"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "side by side: teacher vs student" in printed.out and "student R40" in printed.out
    report = json.loads(js.read_text())
    assert report["role"] == "student" and report["teacher"]["role"] == "teacher"
    assert report["compression"]["compression"] > 3 * report["teacher"]["compression"]["compression"]
    assert sorted(p.stem for p in (out / "teacher").glob("*.txt")) == sorted(p.stem for p in out.glob("*.txt"))
    # no teacher weights known: the student alone, with a note
    rc = _cli().main(["--config", str(cfg_path), "--weights", str(s_ckpt), "--out", str(tmp_path / "e2"),
                      "--no-progress", "--no-coco"])
    printed = capsys.readouterr()
    assert rc == 0 and "teacher not evaluated" in printed.out and "side by side" not in printed.out
    # a config that trains its teacher first: that run's teacher/best.pt is found
    _save(tmp_path / "runs" / "tiny" / "teacher" / "best.pt", teacher)
    rc = _cli().main(["--config", str(cfg_path), "--weights", str(s_ckpt), "--out", str(tmp_path / "e3"),
                      "--no-progress", "--no-coco", "teacher_train={epochs: 1}"])
    printed = capsys.readouterr()
    assert rc == 0 and "side by side: teacher vs student" in printed.out


def test_bad_input_is_a_clean_error(synth, tmp_path, capsys):
    cli = _cli()
    cfg_path = _write_config(tmp_path / "s.yaml", synth, student=True)
    cfg = load_config(cfg_path)
    teacher = build_model(cfg.teacher, CLASSES, (64, 192), load_weights=False)
    t_ckpt = _save(tmp_path / "teacher.pt", teacher, classes=["Car", "Cyclist", "Pedestrian"])
    student, _ = build_student(teacher, cfg)
    s_ckpt = _save(tmp_path / "student.pt", student)
    # teacher trained for other classes
    rc = cli.main(["--config", str(cfg_path), "--weights", str(s_ckpt), "--teacher-weights", str(t_ckpt),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "classes" in err and "Traceback" not in err
    # a teacher checkpoint given as the student's: does not fit the binary model
    t_ok = _save(tmp_path / "teacher_ok.pt", teacher)
    bad_cfg = _write_config(tmp_path / "x.yaml", synth, student=True)
    rc = cli.main(["--config", str(bad_cfg), "--weights", str(t_ok), "--no-teacher", "--no-progress",
                   "student.binary.weight_scaling=learned"])
    err = capsys.readouterr().err
    assert rc == 2 and "do not fit" in err
    # missing dataset: how to get KITTI and how to use the synthetic set
    rc = cli.main(["--config", str(cfg_path), "--weights", str(s_ckpt), f"data.root={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "KITTI data not found" in err and "synthetic" in err and "Traceback" not in err
    # unknown config key: the valid ones are listed
    rc = cli.main(["--config", str(cfg_path), "--weights", str(s_ckpt), "eval.conf_thresh=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key 'eval.conf_thresh'" in err and "conf_thres" in err
    # mode arguments
    with pytest.raises(SystemExit):
        cli.main(["--config", str(cfg_path)])
    with pytest.raises(SystemExit):
        cli.main(["--gt-dir", str(tmp_path)])
