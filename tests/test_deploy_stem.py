"""The small-C_in float conv kernel (`kd_bnn.deploy.kernels.stem_conv2d`, stem.cpp / stem_x86.cpp)
against float64 and torch references for every ISA path, its torch fallback, and the runtime's
use of it for a detector's first conv (`kd_bnn.deploy.runtime.StemConv`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.deploy import kernels as K

U = 2.0**-24
SLOPE = float(torch.tensor(0.1, dtype=torch.float32))  # the kernels' leaky slope, 0.1f

# (batch, c_in, c_out, height, width, kernel, stride, padding, activation, bias): C_in 1..8, odd
# and even sizes, widths not a multiple of 16 and narrower than one vector, rows with full
# 3-vector tiles and tails (avx512: 48 outputs, avx2: 24, portable: 8), C_out not a multiple of the
# 8 / 4 channel blocks, 1x1, 3x3, 5x5, 7x7 and 3x1 kernels, stride 1 and 2, padding 0..3
SHAPES = [
    (1, 3, 32, 20, 100, 3, 1, 1, "leaky", True),
    (2, 3, 16, 17, 67, 3, 2, 1, "leaky", True),
    (1, 1, 5, 9, 5, 3, 1, 1, "relu", False),
    (1, 2, 13, 8, 50, 3, 1, 0, "none", True),
    (2, 4, 9, 11, 33, 1, 1, 0, "relu", True),
    (1, 5, 7, 6, 49, 1, 2, 0, "leaky", False),
    (1, 6, 12, 7, 18, 3, 2, 0, "none", True),
    (1, 7, 3, 10, 97, 5, 1, 2, "leaky", True),
    (1, 8, 20, 12, 130, 3, 1, 1, "relu", True),
    (3, 3, 8, 15, 41, 7, 2, 3, "leaky", True),
    (1, 3, 17, 5, 16, (3, 1), 1, 1, "none", True),
    (1, 8, 1, 4, 3, 3, 1, 1, "leaky", True),
    (1, 3, 24, 13, 250, 3, 2, 1, "relu", True),
]


def _ext_or_skip():
    if not K.extension_available():
        pytest.skip("C++ kernels unavailable (KDBNN_NO_EXT set or no compiler); fallback tested separately")


def _isa_or_skip(isa: str) -> None:
    _ext_or_skip()
    if isa not in K.available_isas():
        pytest.skip(f"this CPU lacks ISA path '{isa}' (has {K.available_isas()})")


def _case(shape, seed=0):
    n, ci, co, h, w, k, s, p, act, has_bias = shape
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed + ci * 131 + co * 7 + h + w)
    x = torch.randn(n, ci, h, w, generator=g)
    x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])[: min(2, w)]
    wt = torch.randn(co, ci, kh, kw, generator=g)
    bias = torch.randn(co, generator=g) if has_bias else None
    return x, wt, bias, s, p, act


def _act64(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return y.clamp_min(0)
    if act == "leaky":
        return torch.where(y < 0, y * SLOPE, y)
    return y


def _reference(x, w, bias, stride, padding, act):
    """Exact-ish float64 result and the magnitude sum|w||x| + |bias| of each output."""
    b64 = None if bias is None else bias.double()
    y = F.conv2d(x.double(), w.double(), b64, stride, padding)
    mag = F.conv2d(x.double().abs(), w.double().abs(), None if bias is None else b64.abs(), stride, padding)
    return _act64(y, act), mag


def _torch_float(x, w, bias, stride, padding, act):
    y = F.conv2d(x, w, bias, stride, padding)
    return F.relu(y) if act == "relu" else F.leaky_relu(y, 0.1) if act == "leaky" else y


def _bound(w, mag):
    """The documented bound: (2K + 4) * 2^-24 * (sum|w||x| + |bias|), K = C_in*KH*KW."""
    k = w.shape[1] * w.shape[2] * w.shape[3]
    return (2 * k + 4) * U * mag + 1e-30


def _check(got, x, w, bias, stride, padding, act):
    ref, mag = _reference(x, w, bias, stride, padding, act)
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    bound = _bound(w, mag)
    err = (got.double() - ref).abs()
    worst = (err / bound).max().item()
    assert bool((err <= bound).all()), f"rounding bound exceeded: max err/bound = {worst:.3f}"
    # and torch's own float32 conv: within both rounding errors
    tf = _torch_float(x, w, bias, stride, padding, act).double()
    assert bool(((got.double() - tf).abs() <= 2 * bound).all())


@pytest.mark.parametrize("isa", K.ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stem_kernel_matches_conv2d(isa, shape):
    _isa_or_skip(isa)
    x, w, bias, s, p, act = _case(shape)
    got = K.stem_conv2d(x, w, bias, s, p, act, backend="ext", isa=isa)
    _check(got, x, w, bias, s, p, act)


@pytest.mark.parametrize("isa", K.ISAS)
def test_stem_kernel_every_activation_and_special_values(isa):
    """Each activation on one shape; outputs of exactly 0 (zero weights of a channel, zero bias),
    inf and NaN inputs behave as in torch where they reach an output."""
    _isa_or_skip(isa)
    x, w, bias, s, p, _ = _case((1, 3, 11, 9, 37, 3, 1, 1, "none", True), seed=5)
    w[2] = 0.0
    bias[2] = 0.0
    for act in ("none", "linear", "relu", "leaky"):
        got = K.stem_conv2d(x, w, bias, s, p, act, isa=isa)
        _check(got, x, w, bias, s, p, "none" if act == "linear" else act)
        assert bool((got[:, 2] == 0).all())
    x2 = x.clone()
    x2[0, 1, 4, 20] = float("nan")
    x2[0, 2, 6, 30] = float("inf")
    for act in ("none", "relu", "leaky"):
        got = K.stem_conv2d(x2, w, bias, s, p, act, isa=isa)
        want = _torch_float(x2, w, bias, s, p, act)
        assert torch.equal(got.isnan(), want.isnan()), act
        assert torch.equal(got.isinf(), want.isinf()), act


def test_rounding_bound_is_tight_enough_to_catch_a_wrong_term():
    """The bound of _check rejects a result with one weight tap changed."""
    x, w, bias, s, p, act = _case(SHAPES[0])
    w_bad = w.clone()
    w_bad[5, 1, 2, 0] *= 1.01
    ref, mag = _reference(x, w, bias, s, p, act)
    bad, _ = _reference(x, w_bad, bias, s, p, act)
    assert bool(((bad - ref).abs() > _bound(w, mag)).any())


@pytest.mark.parametrize("isa", K.ISAS)
def test_threads_and_channel_chunks_equal_single_thread(isa):
    """Rows spread over threads, and (few rows) channel-block chunks: bit-identical to 1 thread."""
    _isa_or_skip(isa)
    old = torch.get_num_threads()
    cases = [(2, 3, 32, 16, 70, 3, 1, 1, "leaky", True), (1, 4, 40, 2, 53, 3, 1, 1, "relu", True)]
    try:
        for shape in cases:
            x, w, bias, s, p, act = _case(shape, seed=2)
            torch.set_num_threads(1)
            one = K.stem_conv2d(x, w, bias, s, p, act, isa=isa)
            torch.set_num_threads(3)
            many = K.stem_conv2d(x, w, bias, s, p, act, isa=isa)
            assert torch.equal(one, many), shape
    finally:
        torch.set_num_threads(old)


def test_large_output_on_aligned_memory():
    """An output of >= 32 MB is a contiguous view at a 2 MB boundary (huge-page advice)."""
    _ext_or_skip()
    x, w, bias, s, p, act = _case((1, 3, 32, 256, 1030, 3, 1, 1, "leaky", True), seed=3)
    got = K.stem_conv2d(x, w, bias, s, p, act)
    assert got.is_contiguous() and got.shape == (1, 32, 256, 1030)
    if got.storage_offset():
        assert got.data_ptr() % (2 << 20) == 0
    _check(got, x, w, bias, s, p, act)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_torch_fallback_equals_torch(shape):
    x, w, bias, s, p, act = _case(shape)
    got = K.stem_conv2d(x, w, bias, s, p, act, backend="torch")
    assert torch.equal(got, _torch_float(x, w, bias, s, p, act))


def test_no_ext_env_uses_the_fallback(monkeypatch):
    monkeypatch.setenv("KDBNN_NO_EXT", "1")
    x, w, bias, s, p, act = _case(SHAPES[1])
    assert torch.equal(K.stem_conv2d(x, w, bias, s, p, act), _torch_float(x, w, bias, s, p, act))


@pytest.mark.parametrize(
    "ci,k,stride,padding",
    [(9, 3, 1, 1), (3, 9, 1, 4), (3, 3, 3, 1), (3, 3, (1, 2), 1), (3, 3, 1, (1, 0)), (2, 3, 1, 70)],
)
def test_unsupported_geometry_runs_torch(ci, k, stride, padding):
    """More than 8 channels, kernels over 7, stride 3, unequal strides or paddings: torch."""
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(1, ci, 9, 12, generator=g), torch.randn(5, ci, k, k, generator=g), torch.randn(5)
    got = K.stem_conv2d(x, w, b, stride, padding, "leaky")
    assert torch.equal(got, F.leaky_relu(F.conv2d(x, w, b, stride, padding), 0.1))


def test_bad_arguments_are_rejected():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="activation"):
        K.stem_conv2d(x, w, None, 1, 1, "gelu")
    with pytest.raises(ValueError, match="weight"):
        K.stem_conv2d(x, torch.randn(4, 2, 3, 3), None, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        K.stem_conv2d(x, w, torch.randn(5), 1, 1)
    with pytest.raises(ValueError, match="input"):
        K.stem_conv2d(x[0], w, None, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        K.stem_conv2d(x, w, None, 0, 1)
    with pytest.raises(ValueError, match="backend"):
        K.stem_conv2d(x, w, None, 1, 1, backend="cuda")
    if K.extension_available():
        with pytest.raises(ValueError, match="ISA"):
            K.stem_conv2d(x, w, None, 1, 1, isa="neon")
        ext = K.load_extension()
        with pytest.raises(RuntimeError, match="input channels"):
            ext.stem_conv(torch.randn(1, 9, 8, 8), torch.randn(4, 9, 3, 3), None, 1, 1, 0, 0)
        with pytest.raises(RuntimeError, match="stride"):
            ext.stem_conv(x, w, None, 3, 1, 0, 0)


# ----------------------------------------------------------------------------- runtime


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)


@pytest.mark.parametrize("mode", ["xnor", "bwn"])
def test_runtime_runs_the_stem_conv_on_the_kernel(tmp_path, mode):
    from kd_bnn.binary import binarize
    from kd_bnn.deploy.export import export
    from kd_bnn.deploy.runtime import Runtime, StemConv
    from kd_bnn.models.darknet.model import load_darknet

    torch.manual_seed(0)
    model = load_darknet("configs/darknet/yolov2-demo.cfg", class_names=["Car", "Pedestrian", "Cyclist"],
                         input_size=(64, 192))
    model, _ = binarize(model, {"mode": mode})
    _randomise_bn(model)
    model.eval()
    assert type(model.layers[0].conv) is nn.Conv2d and model.layers[0].conv.in_channels == 3
    export(model, tmp_path / "m.kdbnn")
    x = torch.rand(2, 3, 64, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(x)
    for backend in (None, "torch"):
        rt = Runtime(tmp_path / "m.kdbnn", backend=backend)
        stem = rt.model.get_submodule("layers.0.conv")
        assert isinstance(stem, StemConv), type(stem)
        assert stem.activation == "leaky" and stem.stride == 2 and stem.padding == 1 and stem.backend == backend
        assert isinstance(rt.model.get_submodule("layers.0.act"), nn.Identity)
        got = rt(x)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), backend
        # the stem alone: kernel output within rounding of the student's conv -> BN -> leaky
        with torch.no_grad():
            ref = model.layers[0](x)
            out = rt.model.layers[0](x)
        assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert not isinstance(Runtime(tmp_path / "m.kdbnn", fuse=False).model.get_submodule("layers.0.conv"), StemConv)


def test_stem_conv_module_only_takes_plain_small_convs():
    from kd_bnn.deploy.runtime import StemConv

    assert StemConv.fits(nn.Conv2d(3, 32, 3, 1, 1))
    assert StemConv.fits(nn.Conv2d(8, 16, 7, 2, 3, bias=False))
    assert not StemConv.fits(nn.Conv2d(9, 32, 3, 1, 1))
    assert not StemConv.fits(nn.Conv2d(3, 32, 3, 3, 1))
    assert not StemConv.fits(nn.Conv2d(3, 32, 3, 1, (1, 0)))
    assert not StemConv.fits(nn.Conv2d(3, 32, 3, 1, 1, padding_mode="reflect"))
    assert not StemConv.fits(nn.Conv2d(4, 8, 3, 1, 1, groups=2))
    assert not StemConv.fits(nn.Conv2d(3, 8, 3, 1, 2, dilation=2))
    assert not StemConv.fits(nn.Conv2d(3, 8, 3, 1, "same"))
    conv = nn.Conv2d(3, 10, 3, 2, 1)
    x = torch.randn(1, 3, 21, 34)
    with torch.no_grad():
        want = F.leaky_relu(conv(x), 0.1)
    got = StemConv(conv, "leaky")(x)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(StemConv(conv, "leaky", backend="torch")(x), want)
