"""Every experiment YAML under configs/ loads, validates and builds its models (teacher, binary
student, distillation taps and adapters) at a small input size; bad keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_bnn.config import ConfigError, load_config, load_yaml_with_base

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SMALL = "data.input_size=[64, 192]"  # a multiple of every family's stride (32)


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _is_fragment(path: Path) -> bool:
    """A shared base (no model named anywhere in its inheritance chain): validated, not built."""
    return "teacher" not in load_yaml_with_base(path)


def test_configs_exist():
    names = {_rel(p) for p in CONFIGS}
    for want in ("base", "darknet_yolov2_fp", "darknet_yolov2_bwn", "darknet_yolov2_bwn_kt", "darknet_yolov2_xnor_kt",
                 "mobilenet_yolov2_fp", "mobilenet_yolov2_bwn", "mobilenet_yolov2_bwn_kt", "yolov8n_fp",
                 "yolov8n_xnor_kt"):
        assert f"configs/kitti/{want}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_builds(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name files relative to the repository root
    cfg = load_config(path, [SMALL])
    if _is_fragment(path):
        return
    for key in ("cfg", "names"):  # a config whose teacher is a user's model names it by a placeholder path
        value = getattr(cfg.teacher, key)
        if value and "/" in value and not (REPO / value).exists():
            pytest.skip(f"teacher.{key} {value} is not here: {_rel(path)} names the model you bring "
                        "(its placeholder points at ../shared/, beside a checkout)")
    from kd_bnn.engine.build import build_model, build_student

    classes = list(cfg.data.classes)
    teacher = build_model(cfg.teacher, classes, tuple(cfg.data.input_size), load_weights=False)
    assert list(teacher.class_names) == classes and tuple(teacher.input_size) == (64, 192)
    if cfg.student is None:
        assert cfg.teacher.weights is None or cfg.teacher_train is None
        return
    student, report = build_student(teacher, cfg)
    assert list(student.class_names) == classes
    from kd_bnn.binary import BinaryConv2d

    binary = [m for m in student.modules() if isinstance(m, BinaryConv2d)]
    assert binary, f"{_rel(path)}: the student has no binary layer"
    assert {m.mode for m in binary} == {cfg.student.binary.mode}
    if cfg.distill.terms:  # every tap resolves on both models (and, for small ones, the adapters build)
        from kd_bnn.distill import Distiller

        small = sum(p.numel() for p in student.parameters()) < 5_000_000  # a probe forward is cheap
        d = Distiller(teacher.eval(), student, cfg.distill.terms, probe=small)
        assert len(d.term_keys()) == len(cfg.distill.terms)
        d.remove_taps()


def test_ablation_pairs_differ_only_in_knowledge_transfer():
    for fam in ("darknet_yolov2", "mobilenet_yolov2"):
        a = load_config(REPO / "configs" / "kitti" / f"{fam}_bwn.yaml").model_dump()
        b = load_config(REPO / "configs" / "kitti" / f"{fam}_bwn_kt.yaml").model_dump()
        assert a["distill"]["enabled"] is False and b["distill"]["enabled"] is True
        a["distill"]["enabled"], a["name"] = True, b["name"]
        assert a == b


def test_unknown_key_in_a_file_lists_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "kitti" / "darknet_yolov2_fp.yaml"),
                                   "train": {"epoch": 3}}))
    with pytest.raises(ConfigError) as ei:
        load_config(bad)
    msg = str(ei.value)
    assert str(bad) in msg and "unknown key 'train.epoch'" in msg and "did you mean 'epochs'" in msg
    assert "warmup_epochs" in msg  # the valid keys of the section are listed
    with pytest.raises(ConfigError, match="unknown key 'student.binary.mod'"):
        load_config(REPO / "configs" / "kitti" / "darknet_yolov2_bwn.yaml", ["student.binary.mod=xnor"])
