"""Evaluating result files never imports torch (or matplotlib unless plots are asked for).

Importing torch costs seconds of process start-up, several times what evaluating the 3769 KITTI
val frames takes, so label I/O (`kd_bnn.data.kitti`), `kd_bnn.eval` and the result-file mode of
``tools/eval.py`` stay torch-free; the torch-using names of `kd_bnn.data` load on first use.
Every check runs in a fresh interpreter (``sys.executable``), since this test process may
already hold torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_TOOL = REPO / "tools" / "eval.py"

#: Never imported by label I/O or evaluation (cv2: only images need it).
HEAVY = ("torch", "torchvision", "ultralytics", "matplotlib", "cv2")

TORCH_FREE_MODULES = (
    "kd_bnn", "kd_bnn.offline", "kd_bnn.io", "kd_bnn.data", "kd_bnn.data.kitti", "kd_bnn.eval",
    "kd_bnn.eval.kitti", "kd_bnn.eval.report", "kd_bnn.eval.coco", "kd_bnn.eval.bench",
)


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def _loaded_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; return which HEAVY packages it left in sys.modules."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    proc = _run(["-c", probe])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", TORCH_FREE_MODULES)
def test_module_imports_without_torch_or_matplotlib(module):
    loaded = _loaded_after(f"import {module}")
    assert not any(loaded.values()), f"import {module} loads {[m for m, v in loaded.items() if v]}"


def test_label_io_names_from_the_package_import_without_torch():
    loaded = _loaded_after("from kd_bnn.data import FrameLabels, KittiFormatError, read_label_file, read_split\n"
                           "import kd_bnn.data as D\n"
                           "assert set(D.__all__) <= set(dir(D))")
    assert not any(loaded.values()), loaded


def test_torch_names_of_the_data_package_still_import():
    """``from kd_bnn.data import KittiDataset`` etc. load their submodule on first use."""
    pytest.importorskip("torch")
    pytest.importorskip("cv2")
    loaded = _loaded_after(
        "import sys\n"
        "import kd_bnn.data as D\n"
        "assert 'torch' not in sys.modules\n"
        "from kd_bnn.data import KittiDataset, build_loader, eval_transforms\n"
        "assert 'torch' in sys.modules\n"
        "from kd_bnn.data.dataset import KittiDataset as K\n"
        "from kd_bnn.data.loader import build_loader as B\n"
        "from kd_bnn.data.transforms import eval_transforms as E\n"
        "assert (KittiDataset, build_loader, eval_transforms) == (K, B, E)\n"
        "ns = {}\n"
        "exec('from kd_bnn.data import *', ns)\n"
        "missing = [n for n in D.__all__ if n not in ns]\n"
        "assert not missing, missing\n"
        "assert D.dataset.KittiDataset is K and D.loader.Batch is D.Batch\n"
        "try:\n"
        "    D.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "try:\n"
        "    from kd_bnn.data import no_such_name  # noqa: F401\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n")
    assert loaded["torch"]


GT = {
    "000000": ["Car 0.00 0 -1.57 100.00 150.00 220.00 230.00 1.5 1.6 3.9 1.0 1.5 20.0 -1.5",
               "Pedestrian 0.00 0 0.10 500.00 140.00 540.00 240.00 1.7 0.6 0.8 2.0 1.6 15.0 0.1",
               "DontCare -1 -1 -10 700.00 160.00 760.00 190.00 -1 -1 -1 -1000 -1000 -1000 -10"],
    "000001": ["Cyclist 0.10 1 0.50 300.00 160.00 360.00 250.00 1.8 0.6 1.7 -3.0 1.6 12.0 0.4",
               "Car 0.00 0 1.20 600.00 170.00 760.00 260.00 1.5 1.7 4.1 4.0 1.6 18.0 1.4"],
    "000002": ["Van 0.00 0 1.20 50.00 170.00 200.00 280.00 2.0 1.9 5.0 -6.0 1.7 14.0 1.1"],
}
PRED = {
    "000000": ["Car -1 -1 -10 102.00 151.00 218.00 232.00 -1 -1 -1 -1000 -1000 -1000 -10 0.9",
               "Pedestrian -1 -1 -10 502.00 141.00 539.00 238.00 -1 -1 -1 -1000 -1000 -1000 -10 0.8",
               "Car -1 -1 -10 900.00 150.00 990.00 220.00 -1 -1 -1 -1000 -1000 -1000 -10 0.3"],
    "000001": ["Cyclist -1 -1 -10 301.00 161.00 362.00 251.00 -1 -1 -1 -1000 -1000 -1000 -10 0.7",
               "Car -1 -1 -10 605.00 172.00 755.00 258.00 -1 -1 -1 -1000 -1000 -1000 -10 0.6"],
    "000002": [],
}


@pytest.fixture
def result_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    gt, pred = tmp_path / "label_2", tmp_path / "results"
    for folder, frames in ((gt, GT), (pred, PRED)):
        folder.mkdir()
        for fid, lines in frames.items():
            (folder / f"{fid}.txt").write_text("".join(line + "\n" for line in lines))
    split = tmp_path / "val.txt"
    split.write_text("".join(f"{fid}\n" for fid in GT))
    return gt, pred, split


def _imported_by(stderr: str) -> set[str]:
    """Top-level packages named in ``-X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


def _eval_tool(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -X importtime tools/eval.py ARGS``: the process exactly as a user runs it."""
    proc = _run(["-X", "importtime", str(EVAL_TOOL), *args])
    imported = _imported_by(proc.stderr)
    assert "kd_bnn" in imported and "numpy" in imported, proc.stderr[-2000:]  # the parse works
    return proc, imported


def test_eval_tool_result_file_mode_does_not_import_torch(result_folder, tmp_path):
    gt, pred, split = result_folder
    args = ["--gt-dir", str(gt), "--pred-dir", str(pred), "--split", str(split),
            "--json", str(tmp_path / "kitti.json")]
    with_coco = importlib.util.find_spec("pycocotools") is not None
    if with_coco:
        args.append("--coco")
    proc, imported = _eval_tool(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KITTI 2D bbox AP" in proc.stdout and "frames: 3;" in proc.stdout
    assert ("COCO-style bbox AP" in proc.stdout) == with_coco
    report = json.loads((tmp_path / "kitti.json").read_text())
    assert "bbox_2d" in report and ("coco" in report) == with_coco
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_eval_tool_plots_import_matplotlib_but_not_torch(result_folder, tmp_path):
    pytest.importorskip("matplotlib")
    gt, pred, split = result_folder
    proc, imported = _eval_tool(["--gt-dir", str(gt), "--pred-dir", str(pred), "--split", str(split),
                                 "--plots", str(tmp_path / "plots")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "car_detection.png", "cyclist_detection.png", "pedestrian_detection.png"]
    assert "matplotlib" in imported
    assert "torch" not in imported
