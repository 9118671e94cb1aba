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
