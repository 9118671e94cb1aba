"""MobileNet-YOLO: structure, passthrough, backbone weights from a local file, fitting one batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_bnn.models import build_detector
from kd_bnn.models.mobilenet_yolo import MobileNetYOLO, SpaceToDepth

CLASSES = ["Car", "Pedestrian", "Cyclist"]
TINY = dict(width_mult=0.35, head_channels=32, passthrough_channels=8, last_conv=False)


def tiny(input_size=(64, 128), **kw) -> MobileNetYOLO:
    torch.manual_seed(0)
    return MobileNetYOLO(CLASSES, input_size, **{**TINY, **kw})


def test_shapes_taps_and_prediction_convs():
    m = tiny()
    raw = m(torch.rand(2, 3, 64, 128))
    assert len(raw) == 1 and raw[0].shape == (2, 5 * 8, 2, 4)
    mods = dict(m.named_modules())
    assert isinstance(mods[m.prediction_convs()[0]], nn.Conv2d)
    assert mods[m.prediction_convs()[0]].out_channels == 40
    seen = {}
    hooks = [mods[p].register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o.shape))
             for n, p in m.taps.items()]
    m(torch.rand(1, 3, 64, 128))
    for h in hooks:
        h.remove()
    assert seen["stride8"][-2:] == (8, 16)
    assert seen["stride16"][-2:] == (4, 8)
    assert seen["stride32"][-2:] == (2, 4)
    assert seen["head"][-2:] == (2, 4)


def test_passthrough_is_space_to_depth():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    y = SpaceToDepth(2)(x)
    assert y.shape == (1, 8, 2, 2)
    # channel c*4 + dy*2 + dx holds x[c, 2i+dy, 2j+dx]
    for c in range(2):
        for dy in range(2):
            for dx in range(2):
                torch.testing.assert_close(y[0, c * 4 + dy * 2 + dx], x[0, c, dy::2, dx::2])


def test_passthrough_feeds_the_head():
    m = tiny().eval()
    x = torch.rand(1, 3, 64, 128)
    base = m(x)[0]
    with torch.no_grad():
        m.passthrough.conv.conv.weight.mul_(3.0)
    assert not torch.allclose(base, m(x)[0])


def test_input_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of the network stride 32"):
        tiny((100, 128))
    with pytest.raises(ValueError, match="multiples"):
        tiny()(torch.rand(1, 3, 70, 128))


def test_backbone_weights_from_local_file(tmp_path):
    from torchvision.models import mobilenet_v2

    ref = mobilenet_v2(weights=None, width_mult=0.35)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    path = tmp_path / "mnv2.pth"
    torch.save(ref.state_dict(), path)  # full torchvision model, incl. classifier
    m = tiny(backbone_weights=path)
    torch.testing.assert_close(m.backbone[0][0].weight, ref.features[0][0].weight)
    torch.testing.assert_close(m.backbone[13].conv[0][0].weight, ref.features[13].conv[0][0].weight)
    from safetensors.torch import save_file

    st = tmp_path / "mnv2.safetensors"
    save_file({k: v.contiguous() for k, v in ref.features.state_dict().items()}, str(st))
    m2 = tiny(backbone_weights=st)
    torch.testing.assert_close(m2.backbone[5].conv[1][0].weight, ref.features[5].conv[1][0].weight)
    with pytest.raises(ValueError, match="width multiplier"):
        tiny(backbone_weights=path, width_mult=0.5)


def test_factory_and_whole_model_weights(tmp_path):
    m = build_detector("mobilenet_yolo", class_names=CLASSES, input_size=(64, 128), **TINY)
    path = tmp_path / "model.pt"
    torch.save(m.state_dict(), path)
    m2 = build_detector("mobilenet_yolo", class_names=CLASSES, input_size=(64, 128), weights=path, **TINY)
    m.eval()
    m2.eval()
    x = torch.rand(1, 3, 64, 128)
    torch.testing.assert_close(m(x)[0], m2(x)[0])
    with pytest.raises(ValueError, match="no cfg"):
        build_detector("mobilenet_yolo", class_names=CLASSES, cfg="x.cfg")


def test_default_anchors_follow_input_size():
    small, big = tiny((192, 640)), tiny((384, 1248))
    ratio = (big.region.anchors_px / small.region.anchors_px)
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))
    assert 1.9 < float(ratio[0, 0]) < 2.0


def test_loss_decreases_fitting_one_batch():
    m = tiny()
    images = torch.rand(2, 3, 64, 128)
    targets = torch.tensor([[0, 0, 10.0, 10.0, 60.0, 50.0], [1, 1, 80.0, 5.0, 100.0, 60.0]])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        total, _ = m.loss(m(images), targets)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.6 * losses[0]
