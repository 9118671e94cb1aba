"""Natively binary students (BinaryDenseNet-YOLO, Bi-Real-YOLO) take their binary options from
``student.binary``: one source, checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.config import ConfigError, load_config
from kd_bnn.engine.build import build_model, build_student, native_binary_options

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.input_size=[64,192]"]


def _student(config: str, overrides: list[str]):
    cfg = load_config(REPO / "configs" / config, SMALL + overrides)
    teacher = build_model(cfg.teacher, cfg.data.classes, cfg.data.input_size, load_weights=False)
    return build_student(teacher, cfg)[0]


def _binary(model) -> list[BinaryConv2d]:
    return [m for m in model.modules() if isinstance(m, BinaryConv2d)]


@pytest.mark.parametrize("config", ["demo_binary_densenet.yaml", "demo_bireal.yaml"])
def test_native_student_reads_student_binary(config):
    xnor = _binary(_student(config, []))
    bwn = _binary(_student(config, ["student.binary.mode=bwn"]))
    assert xnor and {m.mode for m in xnor} == {"xnor"}
    assert len(bwn) == len(xnor) and {m.mode for m in bwn} == {"bwn"}


def test_shipped_densenet_student_keeps_its_family_defaults():
    """BinaryDenseNet as the config describes it: no weight scaling, STE clip 1.3 (as before the
    options moved to student.binary)."""
    convs = _binary(_student("demo_binary_densenet.yaml", []))
    assert {(m.weight_scaling, m.clip) for m in convs} == {("none", 1.3)}


def test_binary_options_in_model_options_are_refused(tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "demo_binary_densenet.yaml", SMALL + ["student.model.options.mode=bwn"])
    with pytest.raises(ConfigError, match=r"student.model.options: mode of the binary_densenet student are set "
                                          r"in student.binary \(student.binary.mode\)"):
        native_binary_options(cfg)
    from toolload import load_tool

    rc = load_tool("train").main([str(REPO / "configs" / "demo_binary_densenet.yaml"), *SMALL,
                                  "student.model.options.mode=bwn", f"output_dir={tmp_path}", "--no-progress"])
    assert rc != 0 and "set in student.binary" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unknown_weight_scaling_is_refused_before_any_work(tmp_path, capsys):
    from toolload import load_tool

    rc = load_tool("train").main([str(REPO / "configs" / "demo.yaml"), *SMALL, "student.binary.weight_scaling=median",
                                  f"output_dir={tmp_path}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "weight_scaling" in err and "unknown weight scaling 'median'" in err
    assert not any(tmp_path.iterdir())
