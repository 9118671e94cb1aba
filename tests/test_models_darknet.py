"""Darknet room: cfg parser, .weights reader/writer, Darknet layer semantics, DarknetDetector."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd_bnn.models.darknet import (
    CfgError,
    DarknetDetector,
    WeightsError,
    WeightsHeader,
    darknet_maxpool,
    darknet_reorg,
    format_cfg,
    load_darknet,
    parse_cfg,
    parse_cfg_text,
    random_weights_,
    save_darknet,
)
from kd_bnn.models.darknet.weights import LayerBlobs, read_weights, write_weights
from kd_bnn.models.detector import DETECTORS, Detections, build_detector

REPO = Path(__file__).resolve().parents[1]
CFG_DIR = REPO / "configs" / "darknet"
SHIPPED = sorted(CFG_DIR.glob("*.cfg"))
DEMO = CFG_DIR / "yolov2-demo.cfg"

torch.set_num_threads(1)

TINY = """[net]
width=64
height=32
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky

[route]
layers=-2

[convolutional]
filters=4
size=1
stride=1
pad=1
activation=leaky

[reorg]
stride=2

[route]
layers=-1,-4

[convolutional]
filters=16
size=1
stride=1
pad=1
activation=linear

[region]
anchors=1,1, 2,3
classes=3
num=2
"""


def tiny(tmp_path: Path, text: str = TINY, **kw) -> DarknetDetector:
    p = tmp_path / "tiny.cfg"
    p.write_text(text)
    return load_darknet(p, **kw)


# ------------------------------------------------------------------ reorg / maxpool semantics

def reorg_c_loop(x: np.ndarray, s: int) -> np.ndarray:
    """Line-by-line port of Darknet's reorg_cpu(input, w, h, c, batch, stride, forward=0, out)
    as forward_reorg_layer calls it (with the input's w, h, c), on flat buffers."""
    b_, c, h, w = x.shape
    flat_in = x.reshape(-1)
    out = np.zeros_like(flat_in)
    out_c = c // (s * s)
    for b in range(b_):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2 = k % out_c
                    offset = k // out_c
                    w2 = i * s + offset % s
                    h2 = j * s + offset // s
                    out_index = w2 + w * s * (h2 + h * s * (c2 + out_c * b))
                    out[in_index] = flat_in[out_index]
    return out.reshape(b_, c * s * s, h // s, w // s)


def test_reorg_hand_computed_example():
    # 4 channels of 2x2 read as one 4x4 image [[0..3], [4..7], [8..11], [12..15]]; output
    # channel k = (dy, dx) offset k, each holding the four pixels of the 2x2 grid.
    x = torch.arange(16, dtype=torch.float32).reshape(1, 4, 2, 2)
    expected = torch.tensor([0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15],
                            dtype=torch.float32).reshape(1, 16, 1, 1)
    assert torch.equal(darknet_reorg(x, 2), expected)
    # ... and it is not PyTorch's space-to-depth
    assert not torch.equal(torch.nn.functional.pixel_unshuffle(x, 2), expected)


@pytest.mark.parametrize("shape,s", [((2, 8, 4, 6), 2), ((1, 18, 6, 3), 3), ((1, 4, 4, 4), 2)])
def test_reorg_matches_darknet_c_loop(shape, s):
    x = torch.randn(*shape)
    np.testing.assert_array_equal(darknet_reorg(x, s).numpy(), reorg_c_loop(x.numpy(), s))


def maxpool_reference(x: np.ndarray, size: int, stride: int, pad: int) -> np.ndarray:
    """Darknet forward_maxpool_layer on (C, H, W)."""
    c, h, w = x.shape
    oh, ow = (h + pad - size) // stride + 1, (w + pad - size) // stride + 1
    off = -(pad // 2)
    out = np.empty((c, oh, ow), dtype=x.dtype)
    for k in range(c):
        for i in range(oh):
            for j in range(ow):
                best = -np.inf
                for n in range(size):
                    for m in range(size):
                        y, xx = off + i * stride + n, off + j * stride + m
                        if 0 <= y < h and 0 <= xx < w:
                            best = max(best, x[k, y, xx])
                out[k, i, j] = best
    return out


@pytest.mark.parametrize("size,stride,hw,out_hw", [
    (2, 1, (5, 7), (5, 7)),   # YOLOv2-tiny's size-2 stride-1 pool keeps the size
    (2, 2, (5, 7), (3, 4)),   # odd sizes round up (padding size-1)
    (2, 2, (6, 8), (3, 4)),
    (3, 1, (4, 5), (4, 5)),
    (3, 2, (7, 7), (4, 4)),
])
def test_maxpool_darknet_padding(size, stride, hw, out_hw):
    x = torch.randn(2, *hw)
    y = darknet_maxpool(x[None], size, stride, size - 1)[0]
    assert tuple(y.shape[-2:]) == out_hw
    np.testing.assert_array_equal(y.numpy(), maxpool_reference(x.numpy(), size, stride, size - 1))


@pytest.mark.parametrize("hw", [(6, 8), (5, 7), (6, 7), (1, 1)])
@pytest.mark.parametrize("pad", [0, 1, 2])
def test_maxpool_2x2_fast_path_equals_the_reference(hw, pad):
    """size 2 stride 2 takes a row-pair / column-pair maximum path: same values as the reference
    for odd and even sizes and every padding (padding 2 starts windows at -1: the general path)."""
    if pad == 0 and min(hw) < 2:
        return
    x = torch.randn(3, *hw)
    y = darknet_maxpool(x[None], 2, 2, pad)[0]
    np.testing.assert_array_equal(y.numpy(), maxpool_reference(x.numpy(), 2, 2, pad))


def test_maxpool_size2_stride1_in_a_cfg(tmp_path):
    text = TINY.replace("[maxpool]\nsize=2\nstride=2", "[maxpool]\nsize=2\nstride=1")
    m = tiny(tmp_path, text, input_size=(32, 32))
    assert m.output_shapes()[1] == (8, 32, 32)


# ------------------------------------------------------------------ cfg parser

def test_parse_keeps_lines_and_round_trips(tmp_path):
    p = tmp_path / "a.cfg"
    p.write_text("# comment\n" + TINY)
    secs = parse_cfg(p)
    assert [s.type for s in secs][:3] == ["net", "convolutional", "maxpool"]
    assert secs[1].line == 7 and secs[1].key_lines["filters"] == 9
    again = parse_cfg_text(format_cfg(secs))
    assert [(s.type, s.options) for s in again] == [(s.type, s.options) for s in secs]


@pytest.mark.parametrize("edit,match", [
    (("[maxpool]", "[maxpooling]"), r"tiny.cfg:14: unknown section \[maxpooling\]"),
    (("size=2\nstride=2", "size=2\nstrid=2"), r"tiny.cfg:16: unknown key 'strid' in \[maxpool\]"),
    (("filters=8", "filters=eight"), r"tiny.cfg:8: \[convolutional\] key 'filters': expected an "
                                     r"integer, found 'eight'"),
    (("anchors=1,1, 2,3", "anchors=1,1, 2,x"), r"tiny.cfg:50: \[region\] key 'anchors'"),
    (("activation=leaky\n\n[maxpool]", "activation=leakyy\n\n[maxpool]"),
     r"tiny.cfg:12: \[convolutional\] key 'activation': expected one of"),
    (("layers=-2", "layers=-9"), r"tiny.cfg:27: \[route\] key 'layers': layer -9 resolves to -6"),
    (("filters=16\nsize=1", "filters=15\nsize=1"), r"tiny.cfg:43: \[convolutional\] before the "
                                                   r"\[region\] at line 49 has filters=15"),
    (("width=64", "width=64\nwidth=32"), r"tiny.cfg:3: key 'width' repeated"),
    (("[reorg]\nstride=2", "[reorg]\nstride=2\nreverse=1"),
     r"tiny.cfg:38: \[reorg\] reverse=1 is not supported"),
    (("[reorg]\nstride=2", "[reorg]\nstride=3"),
     r"tiny.cfg:3: input height 32 is not a multiple of the network stride 6"),
])
def test_cfg_errors_name_file_and_line(tmp_path, edit, match):
    text = TINY.replace(*edit)
    assert text != TINY
    with pytest.raises(CfgError, match=match):
        tiny(tmp_path, text)


def test_parse_darknet_spellings():
    """Spaces around '=', inline comments, empty list items and [network] as Darknet accepts."""
    secs = parse_cfg_text("[network]\nwidth = 416 # px\nheight=416\nsaturation = 1.5\n"
                          "scales=.1,,10.0\n\n[convolutional]\nfilters=3\n")
    assert secs[0].type == "net" and secs[0].get_int("width") == 416
    assert secs[0].get_floats("scales") == [0.1, 10.0]


def test_deepcopy_and_state_dict():
    import copy
    import io

    m = random_weights_(load_darknet(DEMO, input_size=(64, 96)), seed=1).eval()
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m3 = load_darknet(DEMO, input_size=(64, 96)).eval()
    m3.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(m(x)[0], m2(x)[0]) and torch.equal(m(x)[0], m3(x)[0])


def test_cfg_error_when_no_net_first(tmp_path):
    with pytest.raises(CfgError, match=r":1: the first section must be \[net\]"):
        tiny(tmp_path, "[convolutional]\nfilters=3\n")


def test_input_size_not_multiple_of_stride(tmp_path):
    with pytest.raises(CfgError, match=r"tiny.cfg:3: input height 30 is not a multiple of the "
                                       r"network stride 4; valid heights are multiples of 4 "
                                       r"\(e.g. 28 or 32\)"):
        tiny(tmp_path, input_size=(30, 64))
    with pytest.raises(CfgError, match=r"input width 630 is not a multiple .* stride 32"):
        load_darknet(DEMO, input_size=(192, 630))


def test_class_names_must_match_cfg(tmp_path):
    with pytest.raises(CfgError, match=r"classes=3 but 2 class names"):
        tiny(tmp_path, class_names=["Car", "Pedestrian"])
    m = tiny(tmp_path, class_names=["Car", "Pedestrian", "Cyclist"])
    assert m.class_names == ["Car", "Pedestrian", "Cyclist"] and m.num_classes == 3


# ------------------------------------------------------------------ weights

def test_weights_round_trip_identical(tmp_path):
    m = random_weights_(load_darknet(DEMO, input_size=(64, 96)), seed=5).eval()
    w1 = tmp_path / "a.weights"
    save_darknet(m, w1, tmp_path / "a.cfg")
    m2 = load_darknet(tmp_path / "a.cfg", w1).eval()
    assert m2.input_size == (64, 96)
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(m(x), m2(x)):
            assert torch.equal(a, b)
    # the file is exactly header + every float, and saving again gives the same bytes
    n_floats = sum(layer.count for layer in m.weight_layout())
    assert w1.stat().st_size == 20 + 4 * n_floats
    save_darknet(m2, tmp_path / "b.weights")
    assert (tmp_path / "b.weights").read_bytes() == w1.read_bytes()


def test_weights_file_order_is_darknets(tmp_path):
    """BN beta, gamma, mean, var then weights; without BN bias then weights (parser.c)."""
    m = tiny(tmp_path)
    layers, k = [], 0
    for _, conv in m.conv_layers():
        blobs = {}
        for name, t in conv.darknet_blobs():
            blobs[name] = np.arange(t.numel(), dtype=np.float32) + 1000 * k
            k += 1
        layers.append(blobs)
    write_weights(tmp_path / "w.weights", WeightsHeader(0, 2, 0, 12345), layers)
    header = m.load_weights(tmp_path / "w.weights")
    assert header.seen == 12345
    c0 = m.layers[0]
    raw = np.fromfile(tmp_path / "w.weights", dtype="<f4", offset=20)
    assert np.array_equal(raw[:8], c0.bn.bias.detach().numpy())
    assert np.array_equal(raw[8:16], c0.bn.weight.detach().numpy())
    assert np.array_equal(raw[16:24], c0.bn.running_mean.numpy())
    assert np.array_equal(raw[24:32], c0.bn.running_var.numpy())
    assert np.array_equal(raw[32:32 + 8 * 27], c0.conv.weight.detach().numpy().ravel())
    c4 = m.layers[4]  # no BN: bias then weights
    assert c4.bn is None
    start = sum(layer.count for layer in m.weight_layout()[:2])
    assert np.array_equal(raw[start:start + 4], c4.conv.bias.detach().numpy())
    assert np.array_equal(raw[start + 4:start + 4 + 32], c4.conv.weight.detach().numpy().ravel())


@pytest.mark.parametrize("major,minor,int64", [(0, 2, True), (0, 1, False), (1, 0, True),
                                               (1000, 2, False)])
def test_weights_header_seen_width(tmp_path, major, minor, int64):
    h = WeightsHeader(major, minor, 0, 77)
    assert h.seen_is_int64 is int64
    layout = [LayerBlobs("layer 0", [("a", 3)])]
    write_weights(tmp_path / "h.weights", h, [{"a": np.array([1, 2, 3], np.float32)}])
    assert (tmp_path / "h.weights").stat().st_size == (20 if int64 else 16) + 12
    h2, blobs = read_weights(tmp_path / "h.weights", layout)
    assert (h2.major, h2.minor, h2.seen) == (major, minor, 77)
    assert blobs[0]["a"].tolist() == [1, 2, 3]


def test_weights_too_short_and_too_long(tmp_path):
    m = tiny(tmp_path)
    w = tmp_path / "w.weights"
    save_darknet(m, w)
    data = w.read_bytes()
    needed = sum(layer.count for layer in m.weight_layout())
    (tmp_path / "short.weights").write_bytes(data[:-4 * 40])
    with pytest.raises(WeightsError, match=rf"too short: the cfg needs {needed} floats after the "
                                           rf"header, the file has {needed - 40}; it ran out in "
                                           rf"layer 7 \(\[convolutional\] at .*tiny.cfg:42\)"):
        m.load_weights(tmp_path / "short.weights")
    (tmp_path / "long.weights").write_bytes(data + b"\0" * 12)
    with pytest.raises(WeightsError, match=rf"too long: the cfg needs {needed} floats .* the file "
                                           rf"has {needed + 3} \(3 left over"):
        m.load_weights(tmp_path / "long.weights")
    (tmp_path / "odd.weights").write_bytes(data + b"\0")
    with pytest.raises(WeightsError, match="not a whole number of float32"):
        m.load_weights(tmp_path / "odd.weights")


# ------------------------------------------------------------------ the model

@pytest.mark.parametrize("cfg", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_cfgs_build_and_forward(cfg):
    secs = parse_cfg(cfg)
    n_heads = sum(s.type in ("region", "yolo") for s in secs)
    m = load_darknet(cfg, input_size=(64, 96), class_names=["Car", "Pedestrian", "Cyclist"]).eval()
    assert m.stride == 32 and m.input_size == (64, 96)
    with torch.no_grad():
        raws = m(torch.rand(1, 3, 64, 96))
    assert len(raws) == n_heads == len(m.heads)
    for raw, head in zip(raws, m.heads):
        assert raw.shape == (1, head.channels, 64 // head.stride, 96 // head.stride)
    # the cfg's own size: stride 32 and heads at 1/32 (and 1/16 for yolov3)
    net = secs[0]
    assert net.get_int("height") % 32 == 0 and net.get_int("width") % 32 == 0
    assert sorted(h.stride for h in m.heads) == ([16, 32] if n_heads == 2 else [32])
    modules = dict(m.named_modules())
    for name, path in m.taps.items():
        assert path in modules, name
    for path in m.prediction_convs():
        assert isinstance(modules[path], nn.Conv2d)
    assert {"stride8", "stride16", "stride32", "head_in"} <= set(m.taps)


def test_taps_hook_feature_maps():
    m = load_darknet(DEMO, input_size=(64, 96)).eval()
    modules = dict(m.named_modules())
    got = {}
    hooks = [modules[p].register_forward_hook(lambda mod, i, o, n=n: got.__setitem__(n, o))
             for n, p in m.taps.items()]
    with torch.no_grad():
        m(torch.rand(1, 3, 64, 96))
    for h in hooks:
        h.remove()
    assert got["stride8"].shape[-2:] == (8, 12)
    assert got["stride16"].shape[-2:] == (4, 6)
    assert got["stride32"].shape[-2:] == (2, 3)
    assert got["head_in"].shape[-2:] == (2, 3)


def test_forward_matches_plain_torch_reference(tmp_path):
    """The graph executor against the TINY cfg written out by hand with torch.nn.functional."""
    import torch.nn.functional as F

    m = random_weights_(tiny(tmp_path), seed=2).eval()
    x = torch.rand(2, 3, 32, 64)
    L = m.layers

    def cbl(mod, t, stride, pad):
        y = F.conv2d(t, mod.conv.weight, mod.conv.bias, stride, pad)
        if mod.bn is not None:
            bn = mod.bn
            y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-6)
            y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        return y

    with torch.no_grad():
        l0 = F.leaky_relu(cbl(L[0], x, 1, 1), 0.1)
        l1 = F.max_pool2d(F.pad(l0, (0, 1, 0, 1), value=-math.inf), 2, 2)
        l2 = F.leaky_relu(cbl(L[2], l1, 2, 1), 0.1)
        l4 = F.leaky_relu(cbl(L[4], l1, 1, 0), 0.1)
        l5 = torch.from_numpy(reorg_c_loop(l4.numpy(), 2))
        l6 = torch.cat([l5, l2], 1)
        l7 = cbl(L[7], l6, 1, 0)
        assert torch.allclose(m(x)[0], l7, rtol=1e-5, atol=1e-5)


def test_loss_backward_and_predict():
    m = load_darknet(DEMO, input_size=(64, 96), class_names=["Car", "Pedestrian", "Cyclist"])
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 96)
    targets = torch.tensor([[0, 0, 10, 10, 40, 30], [1, 2, 50, 20, 90, 60]], dtype=torch.float32)
    ignore = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 20.0, 20.0]])]
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    losses = []
    m.train()
    for _ in range(6):
        total, parts = m.loss(m(x), targets, ignore)
        assert set(parts) == {"box", "obj", "cls"} and torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < losses[0]
    m.eval()
    with torch.no_grad():
        dets = m.predict(m(x), conf_thres=0.0, iou_thres=0.5, max_det=7)
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    assert all(len(d) <= 7 for d in dets)
    for d in dets:
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 2] <= 96).all()
        assert ((d.labels >= 0) & (d.labels < 3)).all()


def test_yolov3_predictions_merge_over_heads():
    m = load_darknet(CFG_DIR / "yolov3-tiny-demo.cfg", input_size=(64, 96)).eval()
    with torch.no_grad():
        raws = m(torch.rand(1, 3, 64, 96))
        dets = m.predict(raws, conf_thres=0.0, iou_thres=1.0, max_det=100000)
    n_pred = sum(h.num_anchors * r.shape[-2] * r.shape[-1] for h, r in zip(m.heads, raws))
    assert len(dets[0]) == n_pred * 3  # every (box, class) pair of both heads, no NMS
    total, parts = m.loss(raws, torch.tensor([[0, 1, 5.0, 5.0, 60.0, 50.0]]))
    assert torch.isfinite(total)


def test_registered_factory(tmp_path):
    assert "darknet" in DETECTORS
    m = build_detector("darknet", cfg="yolov2-demo", class_names=["Car", "Pedestrian", "Cyclist"],
                       input_size=(64, 128))
    assert isinstance(m, DarknetDetector) and m.input_size == (64, 128)
    with pytest.raises(FileNotFoundError, match="shipped: .*yolov2-demo"):
        build_detector("darknet", cfg="no-such-cfg")
    with pytest.raises(CfgError, match="classes=3 but 1 class names"):
        build_detector("darknet", cfg=str(DEMO), class_names=["Car"])
    with pytest.raises(TypeError, match="takes no options, found \\['width'\\]"):
        build_detector("darknet", cfg=str(DEMO), width=3)
    # weights: Darknet .weights or a kd_bnn state dict (safetensors / weights_only torch file)
    from safetensors.torch import save_file

    random_weights_(m, seed=4).eval()
    save_darknet(m, tmp_path / "m.weights")
    save_file(m.state_dict(), str(tmp_path / "m.safetensors"))
    torch.save({"model": m.state_dict()}, tmp_path / "m.pt")
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        ref = m(x)[0]
        for name in ("m.weights", "m.safetensors", "m.pt"):
            m2 = build_detector("darknet", cfg="yolov2-demo", weights=str(tmp_path / name),
                                input_size=[64, 128], trust=False).eval()
            assert torch.equal(m2(x)[0], ref), name


def test_binary_flags_recorded(tmp_path):
    text = TINY.replace("filters=16\nsize=3\nstride=2", "filters=16\nxnor=1\nsize=3\nstride=2")
    text = text.replace("filters=4\nsize=1", "filters=4\nbinary=1\nsize=1")
    m = tiny(tmp_path, text)
    assert m.binary_flags() == {"layers.2.conv": "xnor", "layers.4.conv": "binary"}
    assert m.prediction_convs() == ["layers.7.conv"]
