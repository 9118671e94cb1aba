"""XNOR / BWN conv kernels against plain torch references, for every ISA path (kd_bnn.deploy.kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_bnn.deploy import kernels as K
from kd_bnn.deploy.pack import pack_activations, pack_signs, unpack_activations

# (batch, c_in, c_out, size, kernel, stride, padding, pad_value)
SHAPES = [
    (2, 70, 33, 9, 3, 1, 1, -1.0),
    (1, 130, 20, 8, 3, 2, 1, 1.0),
    (3, 64, 17, 5, 1, 1, 0, -1.0),
    (1, 600, 40, 6, 3, 1, 1, 1.0),
    (2, 5, 16, 7, 3, 2, 0, -1.0),
    (1, 128, 9, 11, 1, 2, 0, 1.0),
]


def _ext_or_skip():
    if not K.extension_available():
        pytest.skip(
            "C++ kernels unavailable (KDBNN_NO_EXT set or no compiler); fallback tested separately"
        )


def _isa_or_skip(isa: str) -> None:
    _ext_or_skip()
    if isa not in K.available_isas():
        pytest.skip(f"this CPU lacks ISA path '{isa}' (has {K.available_isas()})")


def _case(shape, seed=0):
    n, ci, co, size, k, s, p, pv = shape
    g = torch.Generator().manual_seed(seed + ci * 7 + co)
    x = torch.randn(n, ci, size, size, generator=g)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    w = torch.randn(co, ci, k, k, generator=g)
    return x, w


def _ref_int(x, w, stride, padding, pad_value):
    xs = F.pad(torch.where(x >= 0, 1.0, -1.0), (padding,) * 4, value=pad_value)
    return (
        F.conv2d(xs.double(), torch.where(w >= 0, 1.0, -1.0).double(), stride=stride).round().int()
    )


@pytest.mark.parametrize("isa", K.ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_xnor_exact_integers(isa, shape):
    _isa_or_skip(isa)
    n, ci, co, size, k, s, p, pv = shape
    x, w = _case(shape)
    out = K.xnor_conv2d(x, pack_signs(w), ci, k, s, p, pv, output="int", isa=isa)
    assert out.dtype == torch.int32
    assert torch.equal(out, _ref_int(x, w, s, p, pv))
    panel = K.weight_panel(pack_signs(w))
    assert panel.shape == (k * k * ((ci + 63) // 64), -(-co // 16) * 16)
    again = K.xnor_conv2d(x, pack_signs(w), ci, k, s, p, pv, output="int", panel=panel, isa=isa)
    assert torch.equal(again, out)


@pytest.mark.parametrize("isa", K.ISAS)
def test_xnor_fused_transform_and_packed_output(isa):
    _isa_or_skip(isa)
    n, ci, co, size, k, s, p, pv = shape = (2, 70, 70, 7, 3, 1, 1, 1.0)
    x, w = _case(shape, seed=3)
    g = torch.Generator().manual_seed(5)
    scale, bias = torch.rand(co, generator=g) + 0.01, torch.randn(co, generator=g) * 10
    wp = pack_signs(w)
    dot = _ref_int(x, w, s, p, pv).float()
    for act, ref in [
        ("none", dot * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)),
        ("relu", torch.relu(dot * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))),
        ("leaky", F.leaky_relu(dot * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), 0.1)),
    ]:
        got = K.xnor_conv2d(x, wp, ci, k, s, p, pv, scale=scale, bias=bias, activation=act, isa=isa)
        assert torch.equal(got, ref), act
        fb = K.xnor_conv2d(
            x, wp, ci, k, s, p, pv, scale=scale, bias=bias, activation=act, backend="torch"
        )
        assert torch.equal(got, fb), act
        for op, opv in [(0, -1.0), (1, 1.0), (2, -1.0)]:
            packed = K.xnor_conv2d(
                x,
                wp,
                ci,
                k,
                s,
                p,
                pv,
                scale=scale,
                bias=bias,
                activation=act,
                output="packed",
                out_padding=op,
                out_pad_value=opv,
                isa=isa,
            )
            expect = pack_activations(F.pad(ref, (op,) * 4, value=opv) if op else ref)
            assert torch.equal(packed, expect), (act, op)


@pytest.mark.parametrize("isa", K.ISAS)
def test_xnor_packed_output_signs_of_any_scale_and_bias(isa):
    """Packed output = sign of the float transform for negative, zero and tiny scales, biases that
    land exactly on 0 for some dot products, and non-finite values (the AVX2 epilogue turns the
    sign test into per-channel popcount bounds when scale and bias are finite)."""
    _isa_or_skip(isa)
    n, ci, co, size, k, s, p, pv = shape = (2, 70, 40, 6, 3, 1, 1, -1.0)
    x, w = _case(shape, seed=7)
    wp = pack_signs(w)
    dot = _ref_int(x, w, s, p, pv).float()
    g = torch.Generator().manual_seed(8)
    scale = torch.randn(co, generator=g)
    scale[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    scale[4:12] = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.0, 1.0, -1.0, 3.0])
    bias = torch.randn(co, generator=g) * 20
    bias[:2] = torch.tensor([0.0, -1.0])
    bias[4:12] = torch.tensor([-8.0, 8.0, 0.0, -4.0, 2.0, -2.0, 0.0, -6.0])  # y == 0 at even dots
    variants = [(scale, bias)]
    bad = bias.clone()
    bad[5] = float("inf")
    variants.append((scale, bad))
    for sc, bi in variants:
        for act in ("none", "relu", "leaky"):
            ref = _transform_ref(dot, sc, bi, act)
            for op, opv in [(0, -1.0), (1, 1.0)]:
                got = K.xnor_conv2d(
                    x,
                    wp,
                    ci,
                    k,
                    s,
                    p,
                    pv,
                    scale=sc,
                    bias=bi,
                    activation=act,
                    output="packed",
                    out_padding=op,
                    out_pad_value=opv,
                    isa=isa,
                )
                expect = pack_activations(F.pad(ref, (op,) * 4, value=opv) if op else ref)
                assert torch.equal(got, expect), (act, op, bool(torch.isinf(bi).any()))


def _transform_ref(dot, scale, bias, act):
    y = dot * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    if act == "relu":
        return torch.where(y > 0, y, torch.zeros(()))
    if act == "leaky":
        return torch.where(y > 0, y, y * 0.1)
    return y


@pytest.mark.parametrize("isa", K.ISAS)
def test_xnor_chaining_packed_layers(isa):
    """Layer 1 re-binarizes to padded packed bits; layer 2 consumes them directly."""
    _isa_or_skip(isa)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 40, 9, 9, generator=g)
    w1, w2 = torch.randn(67, 40, 3, 3, generator=g), torch.randn(30, 67, 3, 3, generator=g)
    b1 = torch.randn(67, generator=g)
    h = K.xnor_conv2d(
        x,
        pack_signs(w1),
        40,
        3,
        1,
        1,
        -1.0,
        bias=b1,
        activation="leaky",
        output="packed",
        out_padding=1,
        out_pad_value=1.0,
        isa=isa,
    )
    y = K.xnor_conv2d(h, pack_signs(w2), 67, 3, 2, 1, 1.0, output="int", x_is_padded=True, isa=isa)
    h_ref = F.leaky_relu(_ref_int(x, w1, 1, 1, -1.0).float() + b1.view(1, -1, 1, 1), 0.1)
    assert torch.equal(y, _ref_int(h_ref, w2, 2, 1, 1.0))
    # unpadded packed input, padded inside
    hu = K.xnor_conv2d(
        x, pack_signs(w1), 40, 3, 1, 1, -1.0, bias=b1, activation="leaky", output="packed", isa=isa
    )
    assert torch.equal(unpack_activations(hu, 67), torch.where(h_ref >= 0, 1.0, -1.0))
    y2 = K.xnor_conv2d(hu, pack_signs(w2), 67, 3, 2, 1, 1.0, output="int", isa=isa)
    assert torch.equal(y2, y)


# ---------------------------------------------------------------- BWN: rounding bound
# The BWN kernels sum the same +-x terms as conv2d in another order, so they are checked against a
# float64 reference with a rounding bound per output rather than a global tolerance:
#
#     |y - ref| <= (d + 6) * u * (|alpha| * sum|x| + |bias|),   u = 2**-24,
#
# sum|x| over the output's receptive field (zero padding adds nothing), d the most additions any
# one term goes through: the lookup-table paths (avx2, avx512; kd_bnn/deploy/kernels/bwn_lut.h)
# add table entries (sums of <= 6 inputs, 3 additions deep) once per (tap, group of g >= 4
# channels), so d = KH*KW*ceil(C/4) + 3; the portable direct conv (scalar, popcnt) accumulates all
# K = C*KH*KW products in one sum, d = K. The 6 extra units cover the epilogue's roundings
# (alpha * sum + bias in one FMA, the leaky slope, the tables' sign flips are exact). A dropped,
# doubled or mis-signed term costs about sum|x| / K, far above the bound.
U_EPS = 2.0**-24


def _bwn_reference(x, w, alpha, bias, stride, padding, act):
    """float64 conv2d(x, alpha*sign(W)) + bias -> activation, and sum |alpha| * |x| per output."""
    signs = torch.where(w >= 0, 1.0, -1.0).double()
    a = alpha.double().view(-1, 1, 1, 1)
    ref = F.conv2d(x.double(), signs * a, None if bias is None else bias.double(), stride, padding)
    ref = {"none": ref, "relu": torch.relu(ref), "leaky": F.leaky_relu(ref, 0.1)}[act]
    mag = F.conv2d(x.double().abs(), signs.abs() * a.abs(), None, stride, padding)
    if bias is not None:
        mag = mag + bias.double().abs().view(1, -1, 1, 1)
    return ref, mag


def _bwn_depth(isa: str, c_in: int, kh: int, kw: int) -> int:
    if isa in ("avx2", "avx512"):
        return kh * kw * -(-c_in // 4) + 3
    return c_in * kh * kw


def _check_bwn(isa, x, w, alpha, bias, stride, padding, act):
    k = w.shape[2:]
    got = K.bwn_conv2d(
        x, pack_signs(w), alpha, tuple(k), stride, padding, bias=bias, activation=act, isa=isa
    )
    ref, mag = _bwn_reference(x, w, alpha, bias, stride, padding, act)
    assert got.shape == ref.shape and got.dtype == torch.float32
    bound = (_bwn_depth(isa, x.shape[1], *k) + 6) * U_EPS * mag
    err = (got.double() - ref).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert bool((err <= bound).all()), f"rounding bound exceeded: max err/bound = {worst:.3f}"
    return worst


@pytest.mark.parametrize("isa", K.ISAS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_bwn_matches_conv2d(isa, shape):
    _isa_or_skip(isa)
    n, ci, co, size, k, s, p, _ = shape
    x, w = _case(shape, seed=1)
    alpha = w.abs().mean(dim=(1, 2, 3))
    bias = torch.randn(co, generator=torch.Generator().manual_seed(9))
    _check_bwn(isa, x, w, alpha, bias, s, p, "leaky")


# (batch, c_in, c_out, height, width, kernel, stride, padding, activation, bias): tails and
# variants of the BWN kernels - C_out not a multiple of the 16/8-channel register blocks or of 8,
# C_in not a multiple of the 4/5/6-channel groups or of 64, rows narrower than a 16-pixel tile
# (gathered lanes), tiles across rows and images (masked runs), stride 2 and 3 (gathers), 1x1,
# 5x5, 1x3, padding 0 and 2, batch > 1; stride-1 3x3 layers with rows >= 16 wide take the
# kh-sharing rows kernel (<= 128 output channels), other rows >= 48 wide with
# <= 128 output channels the kw-sharing r4 kernel, >= 256 output channels the 5-bit tables
BWN_SHAPES = [
    (1, 64, 64, 12, 12, 3, 1, 1, "leaky", True),
    (2, 3, 7, 10, 10, 3, 1, 1, "relu", True),
    (1, 70, 13, 11, 11, 3, 2, 1, "none", False),
    (3, 130, 6, 4, 4, 3, 1, 1, "leaky", True),
    (1, 256, 35, 7, 7, 1, 1, 0, "none", True),
    (1, 33, 17, 9, 9, 3, 1, 2, "relu", False),
    (2, 16, 5, 17, 17, 5, 1, 2, "leaky", True),
    (1, 8, 3, 6, 6, 3, 3, 0, "none", True),
    (2, 21, 40, 5, 50, 3, 1, 1, "leaky", True),
    (1, 19, 9, 4, 70, (1, 3), 1, (0, 1), "none", True),
    (1, 40, 260, 6, 6, 3, 1, 1, "leaky", True),
    (1, 67, 300, 5, 3, 1, 1, 0, "relu", False),
    (1, 9, 11, 3, 2, 3, 1, 1, "leaky", True),
]


def _bwn_case(shape):
    n, ci, co, h, wd, k, s, p, act, has_bias = shape
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(ci * 31 + co + h)
    x = torch.randn(n, ci, h, wd, generator=g)
    x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])
    w = torch.randn(co, ci, kh, kw, generator=g)
    alpha = torch.rand(co, generator=g) + 0.1
    bias = torch.randn(co, generator=g) if has_bias else None
    return x, w, alpha, bias, s, p, act


@pytest.mark.parametrize("isa", K.ISAS)
@pytest.mark.parametrize("shape", BWN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bwn_tails_strides_and_activations(isa, shape):
    _isa_or_skip(isa)
    x, w, alpha, bias, s, p, act = _bwn_case(shape)
    if isinstance(p, tuple):  # asymmetric padding: pad by hand, the kernel gets padding 0
        x = F.pad(x, (p[1], p[1], p[0], p[0]))
        p = 0
    _check_bwn(isa, x, w, alpha, bias, s, p, act)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("g", [4, 5, 6])
@pytest.mark.parametrize("kernel", ["r1", "r4", "rows2", "rows3"])
def test_bwn_lookup_table_variants(isa, g, kernel, monkeypatch):
    """Every table size (g = 4, 5, 6 bits) with the r = 1, the kw-sharing r4 and the kh-sharing rows
    kernel (R = 2, 3 rows per tile; where they apply: stride 1, rows: KH 3 or 5 and g <= 5), forced
    through the tuning variables KDBNN_BWN_G / _R4 / _ROWS / _PG, on shapes that stress their
    tails; the same rounding bound."""
    _isa_or_skip(isa)
    monkeypatch.setenv("KDBNN_BWN_G", str(g))
    monkeypatch.setenv("KDBNN_BWN_R4", "1" if kernel == "r4" else "0")
    monkeypatch.setenv("KDBNN_BWN_ROWS", kernel[4:] if kernel.startswith("rows") else "0")
    cases = [
        (2, 23, 37, 6, 53, 3, 1, 1, "leaky", True),  # 2 images, partial last r4 tile
        (1, 64, 24, 9, 17, 5, 1, 2, "relu", True),  # 5x5: 8 r4 input vectors per row; odd rows
        (1, 130, 9, 8, 8, 3, 2, 1, "none", False),  # stride 2: r = 1 (gathers)
        (1, 70, 20, 5, 48, 1, 1, 0, "none", True),  # 1x1
    ]
    for pg in ("", "1", "3"):  # the plan's passes, one table per pass, partial passes
        if pg:
            monkeypatch.setenv("KDBNN_BWN_PG", pg)
        for shape in cases:
            _check_bwn(isa, *_bwn_case(shape))


# the kh-sharing rows kernel's tiles (16 columns of R output rows, flattened over images and row
# bands): bands past the last output row (OH not a multiple of R), tiles across rows, bands and
# images, rows narrower than a tile (more than 4 runs: gathers), padding 0..2 (top and bottom
# rows of a band outside the image), 5x5, odd channel counts (partial groups, register blocks of
# 8 / 4 channels over c_out padded to 8)
BWN_ROWS_SHAPES = [
    (1, 64, 64, 12, 12, 3, 1, 1, "leaky", True),
    (3, 13, 11, 7, 9, 3, 1, 1, "relu", True),
    (2, 21, 40, 5, 50, 3, 1, 1, "leaky", True),
    (1, 9, 11, 3, 2, 3, 1, 1, "leaky", True),
    (2, 7, 5, 4, 3, 3, 1, 0, "none", False),
    (1, 33, 17, 9, 9, 3, 1, 2, "relu", False),
    (2, 16, 5, 17, 17, 5, 1, 2, "leaky", True),
    (1, 19, 260, 6, 21, 5, 1, 1, "none", True),
    (1, 40, 136, 11, 16, 3, 1, 0, "leaky", True),
]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("rows", [2, 3])
@pytest.mark.parametrize("shape", BWN_ROWS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bwn_rows_kernel_tiles(isa, rows, shape, monkeypatch):
    _isa_or_skip(isa)
    monkeypatch.setenv("KDBNN_BWN_ROWS", str(rows))
    monkeypatch.setenv("KDBNN_BWN_R4", "0")
    for g in (4, 5):
        monkeypatch.setenv("KDBNN_BWN_G", str(g))
        _check_bwn(isa, *_bwn_case(shape))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_bwn_prepared_offsets_give_the_per_call_result(isa):
    """bwn_conv2d with bwn_prepare's table offsets equals the call that rebuilds them, bit for bit:
    rows, r = 1 and r4 plans, 5-bit tables, and an offsets tensor prepared for another plan
    (ignored)."""
    _isa_or_skip(isa)
    for shape in [
        (2, 23, 37, 6, 53, 3, 1, 1, "leaky", True),  # rows
        (1, 16, 20, 9, 60, 5, 1, 2, "relu", True),  # r4
        (1, 70, 13, 11, 11, 3, 2, 1, "none", False),  # stride 2, r = 1
        (1, 40, 260, 6, 6, 3, 1, 1, "leaky", True),  # 5-bit tables
    ]:
        x, w, alpha, bias, s, p, act = _bwn_case(shape)
        wp, k = pack_signs(w), tuple(w.shape[2:])
        want = K.bwn_conv2d(x, wp, alpha, k, s, p, bias=bias, activation=act, isa=isa)
        for in_shape in (x.shape, (x.shape[1], 5, 5)):  # this plan, and a small input's (r = 1)
            prep = K.bwn_prepare(wp, in_shape, k, s, p, isa=isa)
            assert prep is not None and prep.dtype == torch.uint8
            got = K.bwn_conv2d(x, wp, alpha, k, s, p, bias=bias, activation=act, isa=isa, prepared=prep)
            assert torch.equal(got, want)
    assert K.bwn_prepare(wp, x.shape, k, s, p, backend="torch") is None


def test_bwn_rounding_bound_is_tight_enough_to_catch_a_wrong_term():
    """The bound of _check_bwn rejects a result with one weight sign flipped (a kernel that
    mis-tabulates or mis-indexes one entry)."""
    x, w, alpha, bias, s, p, act = _bwn_case((1, 64, 8, 6, 6, 3, 1, 1, "none", True))
    w_bad = w.clone()
    w_bad[3, 17, 1, 1] = -w_bad[3, 17, 1, 1]
    ref, mag = _bwn_reference(x, w, alpha, bias, s, p, act)
    bad, _ = _bwn_reference(x, w_bad, alpha, bias, s, p, act)
    bound = (_bwn_depth("avx512", 64, 3, 3) + 6) * U_EPS * mag
    assert bool(((bad - ref).abs() > bound).any())


@pytest.mark.parametrize(
    "shape",
    [
        (2, 70, 5, 19, 1, 1.0),
        (1, 130, 3, 8, 0, -1.0),
        (1, 64, 4, 17, 2, -1.0),
        (3, 5, 2, 9, 1, 1.0),
        (1, 8, 1, 3, 0, 1.0),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_pack_input_matches_torch_including_special_values(shape):
    """The vectorized binarize+pack (8-pixel blocks, pixel and channel tails) equals the torch path."""
    _ext_or_skip()
    n, c, h, w, p, pv = shape
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(c + w))
    flat = x.view(-1)
    flat[:4] = torch.tensor([0.0, -0.0, float("nan"), float("-inf")])  # >= 0: +1, +1, -1, -1
    flat[-1] = float("inf")
    assert torch.equal(K.pack_input(x, p, pv), K.pack_input(x, p, pv, backend="torch"))


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_torch_fallback_matches_reference(shape):
    n, ci, co, size, k, s, p, pv = shape
    x, w = _case(shape, seed=2)
    wp = pack_signs(w)
    assert torch.equal(
        K.xnor_conv2d(x, wp, ci, k, s, p, pv, output="int", backend="torch"),
        _ref_int(x, w, s, p, pv),
    )
    alpha = torch.rand(co) + 0.5
    ref = F.conv2d(x, torch.where(w >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1), None, s, p)
    got = K.bwn_conv2d(x, wp, alpha, k, s, p, backend="torch")
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5
    if K.extension_available():
        assert torch.equal(
            K.xnor_conv2d(x, wp, ci, k, s, p, pv, output="int"),
            K.xnor_conv2d(x, wp, ci, k, s, p, pv, output="int", backend="torch"),
        )
        assert torch.equal(K.pack_input(x, p, pv), K.pack_input(x, p, pv, backend="torch"))


def test_no_ext_env_forces_fallback(monkeypatch):
    monkeypatch.setenv("KDBNN_NO_EXT", "1")
    assert K.load_extension() is None
    assert K.available_isas() == []
    x, w = _case(SHAPES[0])
    out = K.xnor_conv2d(x, pack_signs(w), 70, 3, 1, 1, -1.0, output="int")
    assert torch.equal(out, _ref_int(x, w, 1, 1, -1.0))
    with pytest.raises(RuntimeError, match="unavailable"):
        K.xnor_conv2d(x, pack_signs(w), 70, 3, 1, 1, -1.0, backend="ext")


def test_missing_compiler_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("KDBNN_NO_EXT", raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/kdbnn-c++")
    monkeypatch.setattr(K, "_ext", None)
    monkeypatch.setattr(K, "_ext_tried", False)
    monkeypatch.setattr(K, "_warned", False)
    with pytest.warns(RuntimeWarning, match="compiler"):
        assert K.load_extension() is None
    assert K.load_extension() is None  # cached, no second build attempt
    x, w = _case(SHAPES[2])
    assert torch.equal(
        K.xnor_conv2d(x, pack_signs(w), 64, 1, output="int"), _ref_int(x, w, 1, 0, -1.0)
    )


def test_bad_arguments_are_rejected():
    x, w = _case(SHAPES[0])
    wp = pack_signs(w)
    with pytest.raises(ValueError, match="does not match"):
        K.xnor_conv2d(x, wp, 130, 3)
    with pytest.raises(ValueError, match="input must be"):
        K.xnor_conv2d(x, wp, 71, 3)
    with pytest.raises(ValueError, match="padding value"):
        K.xnor_conv2d(x, wp, 70, 3, padding=1, pad_value=0.0)
    with pytest.raises(ValueError, match="activation"):
        K.xnor_conv2d(x, wp, 70, 3, activation="gelu")
    with pytest.raises(ValueError, match="ISA"):
        K.xnor_conv2d(x, wp, 70, 3, isa="neon") if K.extension_available() else K.resolve_isa(
            "neon"
        )
    with pytest.raises(ValueError, match="alpha"):
        K.bwn_conv2d(x, wp, torch.ones(3), 3)


def test_multithreaded_results_equal_single_thread():
    _ext_or_skip()
    old = torch.get_num_threads()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 70, 13, 13, generator=g)
    w = torch.randn(50, 70, 3, 3, generator=g)
    wp, alpha, bias = pack_signs(w), torch.rand(50, generator=g), torch.randn(50, generator=g)

    def run():
        return (
            K.xnor_conv2d(x, wp, 70, 3, 1, 1, -1.0, bias=bias, activation="leaky"),
            K.xnor_conv2d(x, wp, 70, 3, 2, 1, 1.0, bias=bias, output="packed", out_padding=1),
            K.bwn_conv2d(x, wp, alpha, 3, 1, 1, bias=bias),
            K.pack_input(x, 2, 1.0),
        )

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        many = run()
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_bwn_channel_chunks_for_few_tiles_equal_single_thread(isa):
    """With few tiles per thread the lookup-table kernels split the work below tiles: output-
    channel chunks (tables rebuilt per chunk; lut_chunks decides: 3 tiles on 3 threads stay whole,
    1 or 2 tiles are chunked) or, for layers of >= 256 tables per tile, input parts whose sums a
    combine step adds (lut_kparts: 3 tiles -> 4 parts, 1 tile -> 4, 7 tiles -> 2, set by the
    layer alone). Every output must equal the 1-thread result bit for bit and stay in the bound."""
    _isa_or_skip(isa)
    old = torch.get_num_threads()
    cases = [
        (1, 40, 100, 6, 6, 3, 1, 1, "leaky", True),
        (1, 40, 100, 4, 4, 3, 1, 1, "relu", True),
        (1, 30, 300, 4, 5, 1, 1, 0, "none", True),
        (1, 130, 72, 6, 6, 3, 1, 1, "leaky", True),
        (1, 128, 40, 3, 5, 3, 1, 1, "none", False),
        (2, 128, 24, 7, 8, 3, 1, 1, "relu", True),
    ]
    try:
        for shape in cases:
            x, w, alpha, bias, s, p, act = _bwn_case(shape)
            args = (x, pack_signs(w), alpha, tuple(w.shape[2:]), s, p)
            torch.set_num_threads(1)
            one = K.bwn_conv2d(*args, bias=bias, activation=act, isa=isa)
            torch.set_num_threads(3)
            many = K.bwn_conv2d(*args, bias=bias, activation=act, isa=isa)
            assert torch.equal(one, many), shape
            _check_bwn(isa, x, w, alpha, bias, s, p, act)
    finally:
        torch.set_num_threads(old)


def test_isa_env_var_forces_a_path(monkeypatch):
    _ext_or_skip()
    monkeypatch.setenv("KDBNN_ISA", "scalar")
    assert K.default_isa() == "scalar"
    x, w = _case(SHAPES[4])
    assert torch.equal(
        K.xnor_conv2d(x, pack_signs(w), 5, 3, 2, output="int"), _ref_int(x, w, 2, 0, -1.0)
    )
    monkeypatch.setenv("KDBNN_ISA", "sse9")
    with pytest.raises(ValueError, match="unknown ISA"):
        K.xnor_conv2d(x, pack_signs(w), 5, 3, 2)


def test_extension_builds_where_a_toolchain_exists():
    """A compile error must fail loudly here, not just skip the kernel tests."""
    import os
    import shutil

    if os.environ.get("KDBNN_NO_EXT", "0") not in ("", "0"):
        pytest.skip("KDBNN_NO_EXT is set")
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja on this machine")
    assert K.extension_available(), (
        "the C++ kernels failed to build; see the warning for the build folder"
    )
    assert "scalar" in K.available_isas()


def test_build_cache_key_covers_every_source_by_content(tmp_path, monkeypatch):
    """Editing any .cpp or .h changes the build folder; identical sources elsewhere share it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    files = K._sources()
    names = {p.name for p in files}
    assert {"module.cpp", "dispatch.cpp", "xnor_scalar.cpp", "common.h"} <= names
    assert all(p.suffix in (".cpp", ".h") for p in files)
    other = tmp_path / "other_checkout"
    other.mkdir()
    copies = []
    for p in files:
        (other / p.name).write_bytes(p.read_bytes())
        copies.append(other / p.name)
    key = K._cache_dir(files)
    assert key.parent == tmp_path / "cache"
    assert K._cache_dir(copies) == key  # same contents, another path: same build
    for c in copies:
        original = c.read_bytes()
        c.write_bytes(original + b"\n// edited\n")
        assert K._cache_dir(copies) != key, c.name
        c.write_bytes(original)
    # sources are compiled from a copy in the build folder, rewritten only when they differ
    # (an unchanged file keeps its mtime, so ninja does not recompile it)
    staged = K._stage_sources(files, tmp_path / "src")
    assert sorted(Path(s).name for s in staged) == sorted(n for n in names if n.endswith(".cpp"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()}
    K._stage_sources(files, tmp_path / "src")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()} == before


def test_loading_the_kernels_prints_no_cuda_noise():
    """A CUDA build of torch on a CPU machine warns "No CUDA runtime is found" when
    torch.utils.cpp_extension is imported; the CPU kernels' loader keeps that noise out."""
    import subprocess
    import sys

    code = "from kd_bnn.deploy.kernels import load_extension; load_extension()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "No CUDA runtime is found" not in out.stderr
