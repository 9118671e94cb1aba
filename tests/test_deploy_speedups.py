"""Runtime speed-ups of the fully binary Darknet student: the stem conv with the following 2x2
max-pool fused into its kernel call, RSign's shift folded into the XNOR packer's threshold, float
1x1 convs on the stem row kernels, and huge-page outputs. Each kernel path against its torch
reference on every ISA path the CPU has, and the runtime against the student with each fusion on
and off and with the torch backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blocked import randomise_blocks
from torch import nn

from kd_bnn.binary import binarize
from kd_bnn.deploy import kernels as K
from kd_bnn.models.darknet.model import darknet_maxpool, load_darknet

needs_ext = pytest.mark.skipif(not K.extension_available(), reason="the C++ kernels are not built (no compiler/ninja)")
ISAS = K.available_isas() or ["scalar"]


def _bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """The stem rounding bound (2K + 4) 2^-24 (sum |w||x| + |b|), doubled for F.conv2d's own error."""
    s = (w.abs().reshape(w.shape[0], -1).sum(1).max() * x.abs().max() + b.abs().max()).item()
    return 2 * (2 * k + 4) * 2.0**-24 * s


# ----------------------------------------------------------------------------- 1x1 convs
@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,cin,cout,h,w", [(1, 128, 64, 12, 40), (2, 70, 33, 5, 13), (1, 3, 5, 7, 9),
                                             (1, 1024, 40, 3, 5), (2, 16, 8, 1, 1)])
@pytest.mark.parametrize("act", ["none", "relu", "leaky"])
def test_pointwise_conv_matches_torch(isa, n, cin, cout, h, w, act):
    g = torch.Generator().manual_seed(cin + cout)
    x, wt, b = torch.randn(n, cin, h, w, generator=g), torch.randn(cout, cin, 1, 1, generator=g), torch.randn(cout, generator=g)
    y = F.conv2d(x, wt, b)
    ref = {"none": y, "relu": F.relu(y), "leaky": F.leaky_relu(y, 0.1)}[act]
    got = K.pointwise_conv2d(x, wt, b, act, blocked=K.pointwise_weights(wt, isa), isa=isa)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= _bound(x, wt, b, cin)
    assert torch.equal(K.pointwise_conv2d(x, wt, b, act, backend="torch"), ref)
    no_bias = K.pointwise_conv2d(x, wt, None, act, isa=isa)  # blocked weights made per call
    assert (no_bias - K.pointwise_conv2d(x, wt, None, act, backend="torch")).abs().max().item() <= _bound(x, wt, 0 * b, cin)


# ----------------------------------------------------------------------------- stem + max-pool
@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,c,h,w,co,k,s,p", [(2, 3, 17, 23, 20, 3, 1, 1), (1, 3, 16, 15, 9, 3, 2, 1),
                                               (1, 2, 9, 9, 17, 5, 1, 2), (1, 3, 10, 11, 8, 1, 1, 0),
                                               (1, 3, 2, 2, 4, 1, 1, 0)])
@pytest.mark.parametrize("pool", [0, 1])
@pytest.mark.parametrize("act", ["leaky", "none", "relu"])
def test_stem_pool_is_exactly_conv_then_darknet_maxpool(isa, n, c, h, w, co, k, s, p, pool, act):
    g = torch.Generator().manual_seed(h * w + co)
    x, wt, b = torch.randn(n, c, h, w, generator=g), torch.randn(co, c, k, k, generator=g), torch.randn(co, generator=g)
    full = K.stem_conv2d(x, wt, b, s, p, act, isa=isa)
    if full.shape[2] + pool < 2 or full.shape[3] + pool < 2:
        pytest.skip("map too small for the pool")
    got = K.stem_conv2d(x, wt, b, s, p, act, isa=isa, pool=pool)
    assert torch.equal(got, darknet_maxpool(full, 2, 2, pool))  # max is exact: bit for bit
    tfull = K.stem_conv2d(x, wt, b, s, p, act, backend="torch")
    assert torch.equal(K.stem_conv2d(x, wt, b, s, p, act, backend="torch", pool=pool), darknet_maxpool(tfull, 2, 2, pool))


@needs_ext
def test_stem_pool_propagates_nan_and_rejects_other_pools():
    x = torch.randn(1, 3, 8, 10)
    x[0, 1, 3, 4] = float("nan")
    wt, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    got = K.stem_conv2d(x, wt, b, 1, 1, "leaky", pool=1)
    ref = darknet_maxpool(K.stem_conv2d(x, wt, b, 1, 1, "leaky"), 2, 2, 1)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0))
    with pytest.raises(ValueError, match="pool"):
        K.stem_conv2d(x, wt, b, 1, 1, "leaky", pool=2)


# ----------------------------------------------------------------------------- RSign threshold
@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c,h,w", [(3, 5, 7), (32, 6, 19), (70, 4, 9), (130, 3, 17)])
def test_pack_input_threshold_is_rsign(isa, c, h, w):
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, c, h, w, generator=g)
    bias = torch.randn(c, generator=g) * 0.5
    x[:, :, 0, 0] = -bias  # on the threshold: x + b == 0 -> +1
    x[0, 0, 1, 1] = float("nan")
    want = K.pack_input(x + bias.view(1, -1, 1, 1), 1, -1.0, backend="torch")
    for backend, kw in ((None, {"isa": isa}), ("torch", {})):
        got = K.pack_input(x, 1, -1.0, backend=backend, threshold=-bias, **kw)
        assert torch.equal(got, want), backend
    assert torch.equal(K.pack_input(x, 0, 1.0, isa=isa), K.pack_input(x, 0, 1.0, backend="torch"))


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("stride", [1, 2])
def test_xnor_conv_threshold_matches_shifted_input(isa, stride):
    from kd_bnn.deploy.pack import pack_signs

    g = torch.Generator().manual_seed(stride)
    x = torch.randn(1, 40, 9, 14, generator=g)
    bias = torch.randn(40, generator=g) * 0.3
    wp = pack_signs(torch.randn(24, 40, 3, 3, generator=g))
    sc, bi = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
    args = dict(stride=stride, padding=1, pad_value=-1.0, scale=sc, bias=bi, activation="leaky")
    want = K.xnor_conv2d(x + bias.view(1, -1, 1, 1), wp, 40, 3, backend="torch", **args)
    assert torch.equal(K.xnor_conv2d(x, wp, 40, 3, isa=isa, threshold=-bias, **args), want)
    assert torch.equal(K.xnor_conv2d(x, wp, 40, 3, backend="torch", threshold=-bias, **args), want)
    with pytest.raises(ValueError, match="threshold"):
        K.xnor_conv2d(K.pack_input(x), wp, 40, 3, threshold=-bias)


# ----------------------------------------------------------------------------- the runtime
def _blocked_student() -> nn.Module:
    torch.manual_seed(0)
    m = load_darknet("configs/darknet/yolov2-demo.cfg", class_names=["Car", "Pedestrian", "Cyclist"],
                     input_size=(64, 192))
    m, _ = binarize(m, {"mode": "xnor", "keep_pointwise": True,
                        "block": {"shortcut": True, "rsign": True, "rprelu": True}})
    randomise_blocks(m)
    return m.eval()


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    from kd_bnn.deploy.export import export

    student = _blocked_student()
    path = tmp_path_factory.mktemp("speedups") / "m.kdbnn"
    export(student, path)
    return student, path


@pytest.mark.parametrize("fuse,chains,move,backend", [
    (True, True, True, None), (True, True, False, None), (True, False, True, None), (False, True, True, None),
    (False, False, True, None), (True, True, True, "torch"), (True, False, False, "torch")])
def test_runtime_equals_student_with_each_fusion(student_file, fuse, chains, move, backend):
    from kd_bnn.deploy.runtime import FusedBinaryBlock, PointwiseConv, Runtime, StemConv
    from kd_bnn.models.darknet.packed import STEM_POOL

    student, path = student_file
    rt = Runtime(path, fuse=fuse, packed_chains=chains, backend=backend)
    blocks = [m for m in rt.model.modules() if isinstance(m, FusedBinaryBlock)]
    for b in blocks:
        b.fuse_move = move
    assert bool(blocks) == fuse
    assert any(isinstance(m, PointwiseConv) for m in rt.model.modules()) == fuse
    stem_pool = rt.packed_plan is not None and rt.packed_plan[0] == STEM_POOL
    assert stem_pool == (fuse and chains)
    if stem_pool:
        assert isinstance(rt.model.layers[0].conv, StemConv)
    if fuse and move:
        assert all(b._threshold() is not None for b in blocks)
    x = torch.rand(2, 3, 64, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = student(x)
    got = rt(x)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item()), (fuse, chains, move, backend)


@needs_ext
def test_fusions_give_the_same_maps_as_unfused_kernels(student_file):
    """The stem-pool and RSign fusions are exact: identical output with them on or off."""
    from kd_bnn.deploy.runtime import FusedBinaryBlock, Runtime

    _, path = student_file
    a, b = Runtime(path), Runtime(path, packed_chains=False)
    for m in b.model.modules():
        if isinstance(m, FusedBinaryBlock):
            m.fuse_move = False
    x = torch.rand(1, 3, 64, 192)
    for p, q in zip(a(x), b(x)):
        assert torch.equal(p, q)


@needs_ext
def test_big_outputs_are_huge_page_aligned():
    x = torch.rand(1, 3, 130, 256)
    y = K.stem_conv2d(x, torch.randn(32, 3, 3, 3), None, 1, 1, "leaky")  # 4.3 MB
    assert y.is_contiguous() and y.data_ptr() % (2 << 20) == 0
    small = K.stem_conv2d(x[:, :, :20], torch.randn(8, 3, 3, 3), None, 1, 1)
    assert small.is_contiguous()


@pytest.mark.parametrize("h,w,pool,rows", [(9, 7, 1, 2), (9, 7, 0, 4), (10, 6, 1, 2), (16, 5, 0, 6), (7, 3, 1, 100)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv_pool_in_row_bands_equals_conv_then_pool(h, w, pool, rows, k):
    """Banded conv + pool = the pool of the whole map: odd heights, both Darknet paddings, halos
    of k // 2 rows, bands of any even size (the last band shorter)."""
    from kd_bnn.deploy.runtime import PackedOps

    torch.manual_seed(k)
    block = nn.Sequential(nn.Conv2d(5, 6, k, padding=k // 2), nn.LeakyReLU(0.1)).eval()
    x = torch.randn(2, 5, h, w)
    ops = PackedOps(backend="torch")
    assert ops.can_conv_pool(block[0])
    ops.band_min_bytes, ops.band_bytes = 0, rows * 2 * 6 * w * 4
    with torch.no_grad():
        want = darknet_maxpool(block(x), 2, 2, pool)
        got = ops.conv_pool(block, block[0], x, pool)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_conv_pool_refuses_convs_whose_rows_are_not_local():
    from kd_bnn.deploy.runtime import PackedOps

    ops = PackedOps()
    assert not ops.can_conv_pool(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert not ops.can_conv_pool(nn.Conv2d(4, 4, 3, padding=0))
    assert not ops.can_conv_pool(nn.Conv2d(4, 4, 3, padding=1, dilation=2))
    assert not ops.can_conv_pool(nn.Conv2d(4, 4, (3, 1), padding=(1, 0)))


def test_runtime_bands_conv_pool_pairs_exactly(tmp_path):
    """A BWN Darknet student's conv -> 2x2 max-pool pairs run in row bands (plan CONV_POOL; XNOR
    chains pass packed bits instead) give the maps of the unbanded runtime."""
    from kd_bnn.deploy.export import export
    from kd_bnn.deploy.runtime import Runtime
    from kd_bnn.models.darknet.packed import CONV_POOL

    torch.manual_seed(0)
    m = load_darknet("configs/darknet/yolov2-demo.cfg", class_names=["Car", "Pedestrian", "Cyclist"],
                     input_size=(64, 192))
    m, _ = binarize(m, {"mode": "bwn"})
    path = tmp_path / "m.kdbnn"
    export(m.eval(), path)
    banded, whole = Runtime(path), Runtime(path, packed_chains=False)
    banded.ops.band_min_bytes, banded.ops.band_bytes = 0, 1
    assert CONV_POOL in banded.packed_plan
    x = torch.rand(2, 3, 64, 192, generator=torch.Generator().manual_seed(1))
    for a, b in zip(banded(x), whole(x)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
