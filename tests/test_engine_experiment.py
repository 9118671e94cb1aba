"""End to end on a tiny synthetic set: teacher -> BWN student without / with KD -> table."""

import json

import pytest

from kd_bnn.config import load_config
from kd_bnn.engine.experiment import format_ablation, run_ablation


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    return load_config("configs/demo.yaml", [
        f"data.root={root / 'synthetic'}", "data.synthetic.num=8", "data.synthetic.size=[621, 188]",
        "data.input_size=[64, 192]", "data.batch_size=4", f"output_dir={root / 'runs'}", "name=tiny",
        "teacher_train.epochs=1", "teacher_train.eval_interval=1", "train.epochs=1", "train.eval_interval=1",
    ])


def test_run_ablation_end_to_end(tiny_cfg):
    rows = run_ablation(tiny_cfg, progress=False)
    assert [r["model"] for r in rows] == ["teacher (float32)", "student BWN, no KD", "student BWN + KD"]
    teacher, nokd, kd = rows
    assert teacher["compression"] == pytest.approx(1.0, abs=0.05)
    assert nokd["compression"] > 10 and kd["packed_mb"] == pytest.approx(nokd["packed_mb"])
    for r in rows:
        assert set(r["ap_r40"]) == {"Car", "Pedestrian", "Cyclist"}
        assert all(0.0 <= v <= 100.0 for c in r["ap_r40"].values() for v in c.values())
    run = tiny_cfg.output_dir
    from pathlib import Path

    base = Path(run) / "tiny"
    for sub in ("teacher", "student_nokd", "student_kd"):
        assert (base / sub / "last.pt").is_file() and (base / sub / "metrics.csv").is_file()
    # the KD run really distilled: its metrics log has the mimic terms, the no-KD run does not
    assert "kd/" in (base / "student_kd" / "metrics.csv").read_text()
    assert "kd/" not in (base / "student_nokd" / "metrics.csv").read_text()
    assert json.loads((base / "ablation.json").read_text())[2]["model"] == "student BWN + KD"
    # rows reuse the trainer's final evaluation of the best (= last) state: same as evaluating again
    from kd_bnn.engine.build import load_student
    from kd_bnn.engine.evaluate import evaluate_model

    kd_cfg = tiny_cfg.model_copy(deep=True)
    student = load_student(kd_cfg, base / "student_kd" / "best.pt").eval()
    fresh, _ = evaluate_model(student, kd_cfg)
    assert {c: {d: fresh[f"{c}/{d}/R40"] for d in ("easy", "moderate", "hard")} for c in kd["ap_r40"]} == kd["ap_r40"]
    table = format_ablation(rows)
    assert "student BWN + KD" in table and "Car AP_R40" in table


def test_two_stage_student_starts_from_its_float_weight_stage(tiny_cfg, tmp_path):
    """stage1_train: the xnor student first trains with float weights (phase student_stage1 in
    <run>/stage1), then with binary weights from that phase's best weights; --resume-safe phases."""
    import torch

    from kd_bnn.binary.blocks import BinaryBlock
    from kd_bnn.config import ExperimentConfig
    from kd_bnn.engine.build import load_student
    from kd_bnn.engine.experiment import run_experiment

    data = tiny_cfg.model_dump()
    data.update(name="two_stage", output_dir=str(tmp_path / "runs"), teacher_train={"epochs": 1},
                stage1_train={"epochs": 1, "lr": 0.001, "weight_decay": 0.0})
    data["student"]["binary"].update(mode="xnor", keep_pointwise=True,
                                     block={"shortcut": True, "rsign": True, "rprelu": True})
    cfg = ExperimentConfig.model_validate(data)
    res = run_experiment(cfg, progress=False)
    run = tmp_path / "runs" / "two_stage"
    assert (run / "stage1" / "best.pt").is_file() and (run / "best.pt").is_file()
    assert res["student_stage1"]["epochs"] == 1 and res["student"]["epochs"] == 1
    s1 = torch.load(run / "stage1" / "best.pt", map_location="cpu", weights_only=True)
    key = next(k for k in s1["model"] if k.endswith("layers.4.conv.conv.weight"))
    assert key  # the blocked conv lives inside its BinaryBlock
    student = load_student(cfg, run / "best.pt")
    assert isinstance(student.get_submodule("layers.4.conv"), BinaryBlock)
    assert not any(getattr(m, "float_weights", False) for m in student.modules())
    # the same stage 2 as a separate run: student.weights at stage 1's checkpoint
    from kd_bnn.engine.build import build_model, build_student

    data2 = cfg.model_dump()
    data2.update(stage1_train=None)
    data2["student"]["weights"] = str(run / "stage1" / "best.pt")
    cfg2 = ExperimentConfig.model_validate(data2)
    teacher = build_model(cfg2.teacher, cfg2.data.classes, cfg2.data.input_size, load_weights=False)
    s2, _ = build_student(teacher, cfg2)
    torch.testing.assert_close(s2.state_dict()[key.removeprefix("model.")] if key.startswith("model.") else
                               s2.state_dict()[key], s1["model"][key])


def test_stage2_needs_stage1_checkpoint(tmp_path):
    """student.weights (stage 2 started from stage 1's checkpoint as a separate run): a missing
    file is one clear error before anything is written; another student's checkpoint is refused."""
    from kd_bnn.engine.preflight import check_experiment

    cfg = load_config("configs/demo.yaml", ["student.binary.mode=xnor", f"student.weights={tmp_path / 'stage1' / 'best.pt'}",
                                            f"data.root={tmp_path / 'data'}", "data.synthetic.num=4"])
    with pytest.raises(FileNotFoundError, match="student.weights .*stage1/best.pt does not exist.*run stage 1 first"):
        check_experiment(cfg)
