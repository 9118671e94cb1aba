"""tools/benchmark.py train: teacher / student / KD step timing on a tiny config (random batch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from toolload import load_tool

from kd_bnn.engine.bench import random_batch

REPO = Path(__file__).resolve().parents[1]


def test_random_batch_boxes_inside_the_image():
    b = random_batch(3, (64, 192), 3, boxes_per_image=5, seed=1)
    assert b.images.shape == (3, 3, 64, 192) and b.targets.shape == (15, 6)
    x1, y1, x2, y2 = b.targets[:, 2:].unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 192).all() and (y2 <= 64).all()
    assert (x2 > x1).all() and (y2 > y1).all() and set(b.targets[:, 0].tolist()) == {0.0, 1.0, 2.0}
    assert torch.equal(random_batch(3, (64, 192), 3, seed=1).images, random_batch(3, (64, 192), 3, seed=1).images)
    with pytest.raises(ValueError):
        random_batch(0, (64, 192), 3)


def test_train_subcommand(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: tiny_bench
device: cpu
data: {{root: {tmp_path / 'none'}, input_size: [64, 192], batch_size: 2}}
teacher: {{family: darknet, cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}}}
student: {{binary: {{mode: bwn}}}}
distill:
  terms: [{{loss: mimic_l2, teacher: stride16, student: stride16}}]
""")
    cli = load_tool("benchmark")
    out = tmp_path / "b.json"
    rc = cli.main(["train", "--config", str(cfg), "--steps", "1", "--rounds", "1", "--random-data",
                   "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "KD step / student step" in printed
    res = json.loads(out.read_text())
    for mode in ("teacher", "student", "kd"):
        assert res[mode]["images_per_s"] > 0 and res[mode]["batch_size"] == 2
    assert res["kd_overhead"]["ratio"] == pytest.approx(res["kd"]["step_ms"] / res["student"]["step_ms"])
    assert res["terms"] == ["mimic_l2@stride16"]
    # without --random-data the missing dataset is a clean error; a teacher-only config too
    assert cli.main(["train", "--config", str(cfg), "--steps", "1"]) == 2
    assert "KITTI data not found" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(cfg), "--random-data", "student=null"]) == 2
    assert "student" in capsys.readouterr().err
