"""The `Detector` contract, run over every registered family (as timm tests its registry).

A family registered in `DETECTORS` without an entry in `TINY_BUILDS` fails here, so every new
family gets tested the moment it is registered.
"""

from __future__ import annotations

import pytest
import torch

from kd_bnn.models import DETECTORS, Detections, Detector, build_detector

CLASSES = ["Car", "Pedestrian", "Cyclist"]
SIZE = (64, 128)

#: family -> list of (id, kwargs) building a small model of that family for SIZE.
TINY_BUILDS: dict[str, list[tuple[str, dict]]] = {
    "darknet": [("yolov2-demo", {"cfg": "yolov2-demo"}), ("yolov3-tiny-demo", {"cfg": "yolov3-tiny-demo"})],
    "mobilenet_yolo": [("tiny", {"width_mult": 0.35, "head_channels": 32, "passthrough_channels": 8,
                                 "last_conv": False})],
    "ultralytics": [("yolov8n", {"cfg": "yolov8n.yaml"})],
    "binary_densenet": [("small-xnor", {"preset": "small"}), ("small-bwn", {"preset": "small", "mode": "bwn"})],
    "bireal": [("small-xnor", {"preset": "small"}), ("small-bwn", {"preset": "small", "mode": "bwn"})],
}


def _cases():
    out = []
    for family in DETECTORS.list():
        for case_id, kwargs in TINY_BUILDS.get(family, [("missing", None)]):
            out.append(pytest.param(family, kwargs, id=f"{family}-{case_id}"))
    return out


@pytest.fixture()
def targets():
    return torch.tensor([[0, 0, 8.0, 8.0, 72.0, 56.0], [0, 1, 90.0, 4.0, 110.0, 60.0],
                         [1, 2, 40.0, 10.0, 70.0, 60.0]])


@pytest.mark.parametrize("family, kwargs", _cases())
def test_detector_contract(family, kwargs, targets):
    if kwargs is None:
        pytest.fail(f"family {family!r} is registered but has no tiny build in TINY_BUILDS")
    if family == "ultralytics":
        pytest.importorskip("ultralytics")
    torch.manual_seed(0)
    model = build_detector(family, class_names=CLASSES, input_size=SIZE, **kwargs)
    assert isinstance(model, Detector)
    assert tuple(model.input_size) == SIZE and list(model.class_names) == CLASSES and model.num_classes == 3

    modules = dict(model.named_modules())
    assert model.taps and all(isinstance(k, str) and v in modules for k, v in model.taps.items()), model.taps
    convs = model.prediction_convs()
    assert convs and all(isinstance(modules[c], torch.nn.Conv2d) for c in convs), convs

    seen = {}
    hooks = [modules[p].register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o))
             for n, p in model.taps.items()]
    images = torch.rand(2, 3, *SIZE)
    model.train()
    raw = model(images)
    for h in hooks:
        h.remove()
    assert set(seen) == set(model.taps) and all(isinstance(v, torch.Tensor) for v in seen.values())
    assert isinstance(raw, (list, tuple)) and all(isinstance(r, torch.Tensor) and r.shape[0] == 2 for r in raw)

    ignore = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    total, parts = model.loss(raw, targets, ignore)
    assert total.ndim == 0 and torch.isfinite(total)
    assert parts and all(v.ndim == 0 and torch.isfinite(v) for v in parts.values())
    torch.testing.assert_close(total.detach(), sum(v.detach() for v in parts.values()))
    model.zero_grad()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    empty_total, _ = model.loss(model(images), torch.zeros(0, 6), None)
    assert torch.isfinite(empty_total)

    model.eval()
    with torch.no_grad():
        raw_eval = model(images)
    assert [r.shape for r in raw_eval] == [r.shape for r in raw]
    dets = model.predict(raw_eval, conf_thres=0.0, iou_thres=0.45, max_det=50)
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    h, w = SIZE
    for d in dets:
        assert d.boxes.shape == (len(d), 4) and d.scores.shape == (len(d),) and d.labels.dtype == torch.int64
        assert 0 < len(d) <= 50
        b = d.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert ((d.scores >= 0) & (d.scores <= 1)).all() and ((d.labels >= 0) & (d.labels < 3)).all()
        assert torch.all(d.scores[:-1] >= d.scores[1:])


@pytest.mark.parametrize("family, kwargs", _cases())
def test_loss_decreases_fitting_one_batch(family, kwargs, targets):
    if kwargs is None:
        pytest.fail(f"family {family!r} is registered but has no tiny build in TINY_BUILDS")
    if family == "ultralytics":
        pytest.importorskip("ultralytics")
    torch.manual_seed(0)
    model = build_detector(family, class_names=CLASSES, input_size=SIZE, **kwargs).train()
    images = torch.rand(2, 3, *SIZE)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        total, _ = model.loss(model(images), targets)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
