"""`kd-bnn benchmark --torch-isa`: the torch baseline capped at an ISA, as an AVX2-only CPU runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd_bnn.cli import benchmark as cli
from kd_bnn.deploy import kernels as K

REPO = Path(__file__).resolve().parents[1]


def test_cap_refused_once_torch_is_imported(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert "torch" in sys.modules  # this test module imported it (kd_bnn.deploy.kernels)
    with pytest.raises(ValueError, match="ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 in the environment"):
        cli._cap_torch_isa("avx2")
    cli._cap_torch_isa("native")  # nothing to cap


def test_cap_accepted_when_the_environment_already_has_it(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    cli._cap_torch_isa("avx2")


def test_kernels_cli_caps_torch_and_reports_it(tmp_path):
    if not K.extension_available() or "avx2" not in K.available_isas():
        pytest.skip("needs the C++ kernels and an AVX2 CPU")
    js = tmp_path / "k.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "kernels", "--repeat", "1", "--isa",
                        "avx2", "--torch-isa", "avx2", "--json", str(js)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(js.read_text())
    assert rows and all(r["isa"] == "avx2" and r["torch_isa"] == "aten=AVX2, onednn=AVX2" for r in rows)
    assert "torch: aten=AVX2, onednn=AVX2" in r.stdout
