"""DarknetDetector against OpenCV's Darknet importer (OpenCV 4.x ``cv2.dnn.readNetFromDarknet``).

OpenCV 5 (installed with Ultralytics) dropped the Darknet importer, so this runs when either
the ``cv2`` importable here has ``readNetFromDarknet``, or ``KD_BNN_OPENCV4_PYTHON`` names a
Python interpreter that has it (e.g. ``python3 -m venv /tmp/cv4 && /tmp/cv4/bin/pip install
"opencv-python-headless<5" numpy``, then ``KD_BNN_OPENCV4_PYTHON=/tmp/cv4/bin/python``);
otherwise it is skipped. Random weights, compared on the raw head maps (the output of OpenCV's
``conv_<i>`` layer feeding each ``[region]``/``[yolo]``) to 1e-4 relative.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_bnn.models.darknet import load_darknet, random_weights_, save_darknet

REPO = Path(__file__).resolve().parents[1]
CFG_DIR = REPO / "configs" / "darknet"

# Every layer type and activation the parser supports, in one small net.
ZOO = """[net]
width=64
height=48
channels=3

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=mish

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=swish

[shortcut]
from=-2
activation=leaky

[route]
layers=-1
groups=2
group_id=1

[convolutional]
filters=16
size=1
stride=1
pad=1
activation=logistic

[route]
layers=-1,-3

[maxpool]
size=3
stride=1

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=32
size=3
stride=1
pad=1
groups=4
activation=relu

[dropout]
probability=.3

[upsample]
stride=2

[route]
layers=-1,5

[convolutional]
filters=32
size=1
stride=1
pad=1
activation=leaky

[reorg]
stride=2

[convolutional]
batch_normalize=1
filters=24
size=3
stride=1
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=16
activation=linear

[yolo]
mask=0,1
anchors=10,14, 23,27, 37,58
classes=3
num=3
"""

_OPENCV_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, cv2
    cfg, weights, data, out = sys.argv[1:5]
    d = np.load(data)
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(d["x"])
    names = ["conv_%d" % i for i in d["pred"]]
    outs = net.forward(names)
    np.savez(out, **{"raw%d" % k: o for k, o in enumerate(outs)})
""")


def _opencv_runner() -> str | None:
    try:
        import cv2

        if hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromDarknet"):
            return "inprocess"
    except ImportError:
        pass
    exe = os.environ.get("KD_BNN_OPENCV4_PYTHON")
    if exe and Path(exe).is_file():
        return exe
    return None


RUNNER = _opencv_runner()
pytestmark = pytest.mark.skipif(
    RUNNER is None,
    reason="needs OpenCV 4.x with cv2.dnn.readNetFromDarknet (OpenCV 5 lacks it): set "
           "KD_BNN_OPENCV4_PYTHON to a Python that has it")


def _opencv_maps(cfg: Path, weights: Path, x: np.ndarray, pred: list[int], tmp: Path):
    data, out = tmp / "in.npz", tmp / "out.npz"
    np.savez(data, x=x, pred=np.asarray(pred))
    if RUNNER == "inprocess":
        ns = {"__name__": "opencv_check"}
        import sys

        argv, sys.argv = sys.argv, ["x", str(cfg), str(weights), str(data), str(out)]
        try:
            exec(_OPENCV_SCRIPT, ns)
        finally:
            sys.argv = argv
    else:
        subprocess.run([RUNNER, "-c", _OPENCV_SCRIPT, str(cfg), str(weights), str(data), str(out)],
                       check=True, capture_output=True, timeout=300)
    d = np.load(out)
    return [d[f"raw{k}"] for k in range(len(pred))]


def _compare(cfg: Path, tmp_path: Path, input_size: tuple[int, int]) -> float:
    model = random_weights_(load_darknet(cfg, input_size=input_size), seed=1).eval()
    save_darknet(model, tmp_path / "m.weights", tmp_path / "m.cfg")
    x = torch.rand(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = [r.numpy() for r in model(x)]
    theirs = _opencv_maps(tmp_path / "m.cfg", tmp_path / "m.weights", x.numpy(),
                          [i - 1 for i in model.head_layers], tmp_path)
    worst = 0.0
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst


def test_zoo_of_layers_matches_opencv(tmp_path):
    (tmp_path / "zoo.cfg").write_text(ZOO)
    assert _compare(tmp_path / "zoo.cfg", tmp_path, (48, 64)) < 1e-4


@pytest.mark.parametrize("name", ["yolov2-demo", "yolov3-tiny-demo"])
def test_demo_cfgs_match_opencv(tmp_path, name):
    assert _compare(CFG_DIR / f"{name}.cfg", tmp_path, (96, 320)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov2-kitti", "yolov2-tiny-kitti", "mobilenet-yolov2-kitti",
                                  "yolov3-tiny-kitti"])
def test_kitti_cfgs_match_opencv(tmp_path, name):
    assert _compare(CFG_DIR / f"{name}.cfg", tmp_path, (128, 416)) < 1e-4
