"""Student comparison driver: variant specs and resuming from the rows already measured."""

from __future__ import annotations

import json

import pytest

from kd_bnn.engine import compare


def test_parse_variant():
    assert compare.parse_variant("configs/demo.yaml") == ("configs/demo.yaml", [])
    assert compare.parse_variant("configs/demo.yaml@student.binary.mode=xnor@seed=3") == (
        "configs/demo.yaml", ["student.binary.mode=xnor", "seed=3"])
    with pytest.raises(ValueError, match="without '='"):
        compare.parse_variant("configs/demo.yaml@xnor")


def test_resume_keeps_measured_rows(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a run already in compare_students.json was trained again")

    monkeypatch.setattr(compare, "run_experiment", boom)
    rows = [{"name": f"demo_xnor_{kd}_e3_s2", "student": "darknet copy", "mode": "xnor", "kd": kd == "kd",
             "seed": 2, "params": 1e6, "packed_mb": 0.1, "compression": 20.0, "file_mb": 0.1,
             "ap_r40_moderate": {"Car": 1.0, "Pedestrian": 2.0, "Cyclist": 3.0}, "latency_ms": 1.0}
            for kd in ("nokd", "kd")]
    (tmp_path / "compare_students.json").write_text(json.dumps(rows))
    got = compare.compare_students(["configs/demo.yaml@student.binary.mode=xnor"], "unused.pt", 3, tmp_path,
                                   overrides=["seed=2"])
    assert [r["name"] for r in got] == ["demo_xnor_nokd_e3_s2", "demo_xnor_kd_e3_s2"]
    assert "| darknet copy | xnor | yes |" in (tmp_path / "compare_students.txt").read_text()
