"""W1A8 conv (int8 activations x packed binary weights): every ISA path bit-exact against the torch
reference, the reference against float64 math, int16 overflow guards, quantization, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_bnn.deploy import kernels as K
from kd_bnn.deploy.pack import pack_signs, unpack_signs

# (batch, c_in, c_out, height, width, kernel, stride, padding)
SHAPES = [
    (2, 13, 19, 11, 7, 3, 2, 1),  # C_in, C_out off every block size, stride 2, N = 2
    (1, 70, 33, 9, 9, 3, 1, 1),  # C_in not a multiple of 4, 5 or 64
    (1, 67, 130, 9, 13, 3, 2, 0),  # padding 0, stride 2, C_out not a multiple of 8 / 16
    (2, 64, 17, 5, 6, 1, 1, 0),  # 1x1
    (1, 5, 3, 4, 4, 3, 1, 1),  # tiny
    (1, 256, 260, 6, 5, 3, 1, 1),  # >= 256 output channels: 5-input tables
    (1, 130, 40, 1, 1, 3, 1, 1),  # 1x1 map, padding only around it
    (1, 9, 8, 40, 37, 3, 1, 1),  # many tiles, rows split across tiles
    (2, 21, 24, 5, 70, 3, 1, 1),  # rows >= 64 wide, <= 64 channels: the kw-sharing kernel (avx512)
    (1, 11, 9, 7, 9, 2, 1, 1),  # 2x2 kernel
]
ACTS = ["none", "relu", "leaky"]


def _isa_or_skip(isa: str) -> None:
    if not K.extension_available():
        pytest.skip("C++ kernels unavailable (KDBNN_NO_EXT set or no compiler)")
    if isa not in K.available_isas():
        pytest.skip(f"this CPU lacks ISA path '{isa}' (has {K.available_isas()})")


def _case(shape, seed=0):
    n, ci, co, h, w, k, s, p = shape
    g = torch.Generator().manual_seed(seed + 31 * ci + co)
    xq = torch.randint(-127, 128, (n, ci, h, w), dtype=torch.int8, generator=g)
    wt = torch.randn(co, ci, k, k, generator=g)
    scale = (torch.rand(co, generator=g) + 0.05) * 0.01
    scale[0] = -scale[0]  # a negative scale (BN may flip signs)
    bias = torch.randn(co, generator=g)
    return xq, pack_signs(wt), scale, bias


def _both(shape, isa, act, inv, bias=True, seed=0):
    n, ci, co, h, w, k, s, p = shape
    xq, wp, scale, b = _case(shape, seed)
    b = b if bias else None
    ref = K.w1a8_conv2d(xq, wp, scale, k, s, p, b, act, inv, backend="torch")
    got = K.w1a8_conv2d(xq, wp, scale, k, s, p, b, act, inv, isa=isa)
    return got, ref


@pytest.mark.parametrize("isa", K.ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_w1a8_bit_exact_int8_and_float_output(isa, shape):
    _isa_or_skip(isa)
    for i, act in enumerate(ACTS):
        for inv in (None, 2.5):
            got, ref = _both(shape, isa, act, inv, bias=i != 1)
            assert got.dtype == (torch.float32 if inv is None else torch.int8)
            assert got.shape == ref.shape
            assert torch.equal(got, ref), (isa, shape, act, inv)
    if shape[0] == 2:  # the int8 output really is clamped somewhere, and spans signs
        got, _ = _both(shape, isa, "none", 50.0)
        assert got.max() == 127 and got.min() == -127


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("g", [4, 5])
@pytest.mark.parametrize("pg", [1, 7, 1000])
@pytest.mark.parametrize("kernel", ["plain", "r4", "rows"])
def test_w1a8_table_size_pass_and_kernel_variants(isa, g, pg, kernel, monkeypatch):
    """Every table size, pass length (1000: clamped to the int16 bound; windows of several passes
    share an int16 sum) and kernel (r4: kw-sharing, rows: kh-sharing, stride 1 only) gives the same
    integers."""
    _isa_or_skip(isa)
    _kernel_env(monkeypatch, kernel, g, pg)
    for shape in (SHAPES[1], SHAPES[2], SHAPES[5], SHAPES[8], SHAPES[9]):
        for inv in (3.0, None):
            got, ref = _both(shape, isa, "leaky", inv)
            assert torch.equal(got, ref), (isa, g, pg, kernel, shape, inv)


def _kernel_env(monkeypatch, kernel, g=None, pg=None):
    """Force a kernel of the lookup-table paths (where it applies) and optionally g / pass length."""
    if g is not None:
        monkeypatch.setenv("KDBNN_W1A8_G", str(g))
    if pg is not None:
        monkeypatch.setenv("KDBNN_W1A8_PG", str(pg))
    monkeypatch.setenv("KDBNN_W1A8_R4", "1" if kernel == "r4" else "0")
    monkeypatch.setenv("KDBNN_W1A8_ROWS", "1" if kernel == "rows" else "0")


# The kh-sharing (rows) kernel: 3x3 stride 1, tiles of 32 positions of the (2-row band, column)
# domain; vectors that span bands or rows narrower than 32 load in masked runs.
ROWS_SHAPES = [
    (1, 128, 128, 40, 40, 3, 1, 1),  # the benchmark shape (5 tiles per 4 bands, most spanning two)
    (2, 13, 19, 11, 7, 3, 1, 1),  # batch 2, odd height (last band one row), narrow rows, odd channels
    (1, 70, 33, 9, 9, 3, 1, 0),  # padding 0, C_in off 4 / 5 / 64
    (2, 9, 72, 5, 3, 3, 1, 2),  # padding 2, 7 x 5 outputs: one tile of 4 bands (4 runs, the last one row)
    (1, 6, 8, 1, 1, 3, 1, 1),  # one output: one band, one lane
    (1, 21, 130, 2, 70, 3, 1, 1),  # one band of two rows, C_out off 8 / 16
    (2, 40, 64, 13, 33, 3, 1, 1),  # rows just past 32
    (1, 5, 3, 3, 3, 3, 1, 0),  # one output from a 3x3 input
]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("g", [4, 5])
@pytest.mark.parametrize("pg", [1, 2, 1000])
def test_w1a8_rows_kernel_bit_exact(isa, g, pg, monkeypatch):
    """The rows kernel (avx512; the avx2 path ignores the switch) equals the torch reference for
    every activation and output type, at odd sizes, paddings, batch 2 and narrow rows."""
    _isa_or_skip(isa)
    _kernel_env(monkeypatch, "rows", g, pg)
    for shape in ROWS_SHAPES:
        for i, act in enumerate(ACTS):
            for inv in (None, 2.5):
                got, ref = _both(shape, isa, act, inv, bias=i != 1)
                assert torch.equal(got, ref), (isa, g, pg, shape, act, inv)


@pytest.mark.parametrize("isa", K.ISAS)
def test_w1a8_prepared_offsets_give_the_per_call_result(isa, monkeypatch):
    """w1a8_conv2d with w1a8_prepare's table offsets equals the call that rebuilds them, bit for
    bit: plain, kw-sharing and kh-sharing (rows) plans, 5-bit tables, batch 2, and offsets prepared for another plan
    (another input size, table size or kernel: ignored, rebuilt per call)."""
    _isa_or_skip(isa)
    for shape in (SHAPES[0], SHAPES[2], SHAPES[5], SHAPES[8], SHAPES[9]):
        n, ci, co, h, w, k, s, p = shape
        xq, wp, scale, b = _case(shape)
        want = K.w1a8_conv2d(xq, wp, scale, k, s, p, b, "leaky", 3.0, backend="torch")
        preps = [K.w1a8_prepare(wp, xq.shape, k, s, p, isa=isa), K.w1a8_prepare(wp, (ci, 3, 3), k, s, p, isa=isa)]
        for env in ("KDBNN_W1A8_G", "KDBNN_W1A8_R4", "KDBNN_W1A8_ROWS"):  # a foreign plan: the other
            monkeypatch.setenv(env, "5" if env.endswith("G") else "0")  # table size / kernel
            preps.append(K.w1a8_prepare(wp, xq.shape, k, s, p, isa=isa))
            monkeypatch.delenv(env)
        if isa in ("scalar", "popcnt"):
            assert all(t is None for t in preps)  # no lookup-table kernel: nothing to prepare
        else:
            assert all(t is not None and t.dtype == torch.uint8 for t in preps)
        for prep in preps:
            got = K.w1a8_conv2d(xq, wp, scale, k, s, p, b, "leaky", 3.0, isa=isa, prepared=prep)
            assert torch.equal(got, want), (isa, shape)
    assert K.w1a8_prepare(wp, xq.shape, k, s, p, backend="torch") is None


@pytest.mark.parametrize("isa", K.ISAS)
@pytest.mark.parametrize("g", [4, 5])
@pytest.mark.parametrize("kernel", ["plain", "r4", "rows"])
@pytest.mark.parametrize("pg", [1000, 3])
def test_w1a8_extreme_inputs_never_overflow_int16(isa, g, kernel, pg, monkeypatch):
    """All +127 / all -127 (and -128) inputs with all-+1 weights: every table entry at its bound
    and long int16 runs (1000: the longest pass the bound allows, rows g = 4: 7 units x 9 taps = 63
    entries, the bound itself; 3: windows of several passes): sums must stay exact."""
    _isa_or_skip(isa)
    _kernel_env(monkeypatch, kernel, g, pg)
    ci, co, k = 640, 24, 3
    wp = pack_signs(torch.ones(co, ci, k, k))
    wp_neg = pack_signs(-torch.ones(co, ci, k, k))
    scale = torch.ones(co)
    for v in (127, -127, -128):
        xq = torch.full((1, ci, 7, 7), v, dtype=torch.int8)
        for w in (wp, wp_neg):
            got = K.w1a8_conv2d(xq, w, scale, k, 1, 1, isa=isa)
            ref = K.w1a8_conv2d(xq, w, scale, k, 1, 1, backend="torch")
            assert torch.equal(got, ref)
            sign = 1 if w is wp else -1
            assert got[0, :, 2, 2].eq(sign * v * ci * k * k).all()  # interior: the full sum


def test_w1a8_reference_matches_float64_of_dequantized_values():
    """The torch reference is the conv of x = s_in * xq with alpha * sign(W), BN folded into scale."""
    n, ci, co, h, w, k, s, p = 2, 37, 21, 9, 8, 3, 2, 1
    g = torch.Generator().manual_seed(5)
    xq = torch.randint(-127, 128, (n, ci, h, w), dtype=torch.int8, generator=g)
    wt = torch.randn(co, ci, k, k, generator=g)
    s_in, alpha, bn = 0.037, wt.abs().mean((1, 2, 3)), torch.rand(co, generator=g) + 0.5
    shift = torch.randn(co, generator=g)
    scale = (alpha * s_in * bn).float()
    y = K.w1a8_conv2d(xq, pack_signs(wt), scale, k, s, p, shift, "leaky", backend="torch")
    x64 = xq.double() * s_in
    w64 = unpack_signs(pack_signs(wt), ci, k, k).double() * alpha.double().view(-1, 1, 1, 1)
    r = F.conv2d(x64, w64, stride=s, padding=p) * bn.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    r = torch.where(r > 0, r, r * 0.1)
    assert torch.allclose(y.double(), r, rtol=1e-5, atol=1e-5)
    # the integer part is exact: acc = round(y_none - bias) / scale recovers integers
    acc = F.conv2d(xq.double(), unpack_signs(pack_signs(wt), ci, k, k).double(), stride=s, padding=p)
    y0 = K.w1a8_conv2d(xq, pack_signs(wt), torch.ones(co), k, s, p, backend="torch")
    assert torch.equal(y0.double(), acc)
    # int8 output = quantize_activations of the float output
    q = K.w1a8_conv2d(xq, pack_signs(wt), scale, k, s, p, shift, "leaky", 20.0, backend="torch")
    assert torch.equal(q, K.quantize_activations(y, 20.0, backend="torch"))


@pytest.mark.parametrize("path", ["torch", *K.ISAS])
def test_quantize_activations_rounds_half_to_even_and_clamps(path):
    kw = {"backend": "torch"} if path == "torch" else {"isa": path}
    if path != "torch":
        _isa_or_skip(path)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.4, 300.0, -127.5, -1e9, 0.0, -0.0, 3.49999])
    want = [0, 2, 2, 0, -2, -2, 126, 127, 127, -127, -127, 0, 0, 3]
    for reps in (1, 5):  # 14 values: the scalar tail; 70: the vector loops too
        q = K.quantize_activations(x.repeat(reps), 1.0, **kw)
        assert q.dtype == torch.int8 and q.tolist() == want * reps
    halves = torch.arange(-600, 601, dtype=torch.float32) * 0.25  # every .5 and .25 up to +-150
    assert torch.equal(K.quantize_activations(halves, 1.0, **kw), K.quantize_activations(halves, 1.0, backend="torch"))
    g = torch.Generator().manual_seed(1)
    big = torch.randn(3, 5, 17, 19, generator=g) * 40
    inv = 1 / 0.37
    assert torch.equal(K.quantize_activations(big, inv, **kw), K.quantize_activations(big, inv, backend="torch"))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_w1a8_threads_and_channel_chunks_equal_single_thread(isa):
    _isa_or_skip(isa)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(_both((1, 40, 72, 5, 5, 3, 1, 1), isa, "relu", 4.0)[0])  # 1 tile: chunks
            outs.append(_both(SHAPES[7], isa, "leaky", None)[0])
        assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    finally:
        torch.set_num_threads(old)


def test_w1a8_no_ext_env_uses_the_reference(monkeypatch):
    xq, wp, scale, bias = _case(SHAPES[0])
    ref = K.w1a8_conv2d(xq, wp, scale, 3, 2, 1, bias, "leaky", 3.0, backend="torch")
    monkeypatch.setenv("KDBNN_NO_EXT", "1")
    assert torch.equal(K.w1a8_conv2d(xq, wp, scale, 3, 2, 1, bias, "leaky", 3.0), ref)


def test_w1a8_bad_arguments_are_rejected():
    xq, wp, scale, bias = _case(SHAPES[1])
    with pytest.raises(ValueError, match="int8"):
        K.w1a8_conv2d(xq.float(), wp, scale, 3, 1, 1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        K.w1a8_conv2d(xq[0], wp, scale, 3, 1, 1)
    with pytest.raises(ValueError, match="does not match C_in"):
        K.w1a8_conv2d(xq, wp, scale, 1, 1, 1)
    with pytest.raises(ValueError, match="does not match C_in"):
        K.w1a8_conv2d(xq[:, :5], wp, scale, 3, 1, 1)
    with pytest.raises(ValueError, match="scale has"):
        K.w1a8_conv2d(xq, wp, scale[:-1], 3, 1, 1)
    with pytest.raises(ValueError, match="bias has"):
        K.w1a8_conv2d(xq, wp, scale, 3, 1, 1, bias=bias[:3])
    with pytest.raises(ValueError, match="unknown activation"):
        K.w1a8_conv2d(xq, wp, scale, 3, 1, 1, activation="gelu")
    with pytest.raises(ValueError, match="stride"):
        K.w1a8_conv2d(xq, wp, scale, 3, 0, 1)
    with pytest.raises(ValueError, match="stride"):
        K.w1a8_conv2d(xq, wp, scale, 3, 1, -1)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        K.w1a8_conv2d(xq[:, :, :1, :1], wp, scale, 3, 1, 0)
    with pytest.raises(ValueError, match="float tensor"):
        K.quantize_activations(xq, 1.0)


def test_benchmark_rows_time_w1a8():
    if not K.extension_available():
        pytest.skip("C++ kernels unavailable")
    from kd_bnn.deploy.kernels.bench import ConvShape, benchmark_kernels

    (row,) = benchmark_kernels((ConvShape(8, 16, 6),), repeat=1, warmup=0)
    assert row.w1a8_ms > 0 and row.w1a8_float_ms > 0
    assert row.w1a8_speedup == pytest.approx(row.torch_fp32_ms / row.w1a8_ms)
