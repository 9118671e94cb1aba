"""Ultralytics adapter: formats, decode against Ultralytics' own, loss, DontCare, .pt trust."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("ultralytics")

from kd_bnn.models import build_detector  # noqa: E402
from kd_bnn.models.ultralytics import UltralyticsDetector  # noqa: E402

CLASSES = ["Car", "Pedestrian", "Cyclist"]
SIZE = (64, 128)


@pytest.fixture(scope="module")
def v8() -> UltralyticsDetector:
    torch.manual_seed(0)
    return build_detector("ultralytics", cfg="yolov8n.yaml", class_names=CLASSES, input_size=SIZE)


def test_module_does_not_import_ultralytics_at_top_level():
    import ast
    from pathlib import Path

    import kd_bnn.models.ultralytics as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    for node in tree.body:  # module-level statements only; functions import lazily
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "ultralytics" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "ultralytics"


@pytest.mark.slow
def test_import_is_lazy_and_threads_kept():
    import subprocess

    code = ("import sys, torch; torch.set_num_threads(2); import kd_bnn.models as m; "
            "assert 'ultralytics' not in sys.modules; "
            "m.build_detector('ultralytics', cfg='yolov8n.yaml', class_names=['a'], input_size=(64, 64)); "
            "assert 'ultralytics' in sys.modules; print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"


def test_raw_maps_same_in_train_and_eval(v8):
    x = torch.rand(2, 3, *SIZE)
    v8.train()
    raw_t = v8(x)
    assert [tuple(r.shape) for r in raw_t] == [(2, 64 + 3, 8, 16), (2, 67, 4, 8), (2, 67, 2, 4)]
    v8.eval()
    with torch.no_grad():
        raw_e = v8(x)
    assert [r.shape for r in raw_e] == [r.shape for r in raw_t]
    v8.train()


def test_decode_matches_ultralytics_inference(v8):
    x = torch.rand(1, 3, *SIZE)
    v8.eval()
    with torch.no_grad():
        y, _ = v8.model(x)  # Ultralytics' own decode: (B, 4 + nc, N), xywh in pixels
        boxes, scores = v8.decode(v8(x))
    v8.train()
    xywh = y[:, :4].transpose(1, 2)
    ref = torch.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2), dim=-1)
    torch.testing.assert_close(boxes, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scores, y[:, 4:].transpose(1, 2))


def test_taps_are_detect_inputs_and_prediction_convs(v8):
    mods = dict(v8.named_modules())
    detect = v8.detect
    assert sorted(v8.taps) == ["stride16", "stride32", "stride8"]
    assert [v8.taps[f"stride{s}"] for s in (8, 16, 32)] == [f"model.model.{i}" for i in detect.f]
    convs = v8.prediction_convs()
    assert len(convs) == 6  # 3 box + 3 class branches
    assert all(isinstance(mods[c], torch.nn.Conv2d) for c in convs)
    assert {mods[c].out_channels for c in convs} == {64, 3}
    fixed = v8.fixed_convs()  # DFL's integral conv: fixed weights, never binarized
    assert list(fixed) == [f"{v8._det_path}.dfl.conv"] and mods[next(iter(fixed))].out_channels == 1


def test_loss_matches_ultralytics_and_decreases(v8):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *SIZE)
    targets = torch.tensor([[0, 0, 8.0, 8.0, 72.0, 56.0], [1, 2, 64.0, 16.0, 112.0, 64.0]])
    raw = v8(x)
    total, parts = v8.loss(raw, targets)
    assert set(parts) == {"box", "cls", "dfl"}
    # the same loss computed by Ultralytics from its own batch dict (normalised xywh)
    batch = {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[40 / 128, 32 / 64, 64 / 128, 48 / 64], [88 / 128, 40 / 64, 48 / 128, 48 / 64]])}
    ref, _ = v8.model.init_criterion()(v8._maps_to_dict(raw), batch)
    torch.testing.assert_close(total, ref.sum() / 2)
    opt = torch.optim.Adam(v8.parameters(), lr=2e-3)
    first = float(total.detach())
    for _ in range(6):
        total, _ = v8.loss(v8(x), targets)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(total.detach()) < first


def test_dontcare_masks_negative_class_loss(v8):
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        raw = v8(x)
    empty = torch.zeros(0, 6)
    base = v8.loss(raw, empty)[1]["cls"]
    everywhere = v8.loss(raw, empty, [torch.tensor([[0.0, 0.0, 128.0, 64.0]])])[1]["cls"]
    half = v8.loss(raw, empty, [torch.tensor([[0.0, 0.0, 64.0, 64.0]])])[1]["cls"]
    assert float(base) > 0 and float(everywhere) == 0.0 and 0 < float(half) < float(base)
    # a truth inside the DontCare area is still trained (assigned anchors keep their loss)
    t = torch.tensor([[0, 1, 16.0, 8.0, 48.0, 56.0]])
    with_obj = v8.loss(raw, t, [torch.tensor([[0.0, 0.0, 128.0, 64.0]])])[1]["cls"]
    assert float(with_obj) > 0


def test_pt_requires_trust_and_round_trips(v8, tmp_path):
    path = tmp_path / "trained.pt"
    torch.save({"model": v8.model, "train_args": {"box": 5.0, "cls": 1.0, "dfl": 2.0}}, path)
    with pytest.raises(PermissionError, match="trust"):
        build_detector("ultralytics", cfg=str(path), class_names=CLASSES, input_size=SIZE)
    loaded = build_detector("ultralytics", cfg=str(path), input_size=SIZE, trust=True)
    assert loaded.class_names == CLASSES
    assert (loaded.model.args.box, loaded.model.args.cls, loaded.model.args.dfl) == (5.0, 1.0, 2.0)
    v8.eval()
    loaded.eval()
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        for a, b in zip(v8(x), loaded(x)):
            torch.testing.assert_close(a, b)
    v8.train()
    with pytest.raises(ValueError, match="3 classes"):
        build_detector("ultralytics", weights=str(path), class_names=["Car"], input_size=SIZE, trust=True)


def test_bad_inputs():
    with pytest.raises(ValueError, match="yaml"):
        build_detector("ultralytics", cfg="yolov8n.cfg", class_names=CLASSES)
    with pytest.raises(ValueError, match="multiples"):
        build_detector("ultralytics", cfg="yolov3-tiny.yaml", class_names=CLASSES, input_size=(100, 128))
