"""Packed-activation chaining of the binary-friendly students (Bi-Real-YOLO, BinaryDenseNet-YOLO):
the fused XNOR epilogue (residual, float + packed, popcount bounds, output table), the packed concat,
the plans, and the runtime with chaining on equal to chaining off and to the torch backend."""

from __future__ import annotations

import pytest
import torch
from test_deploy_runtime import SIZE, _family_student, _rel_err

from kd_bnn.deploy.export import export
from kd_bnn.deploy.kernels import (
    _fma32,
    available_isas,
    concat_packed,
    output_affine,
    output_table,
    pack_input,
    popcount_bounds,
    sign_thresholds,
    xnor_conv2d,
)
from kd_bnn.deploy.pack import pack_signs
from kd_bnn.deploy.runtime import PackedOps, Runtime

BACKENDS = [(isa, None) for isa in available_isas()] + [(None, "torch")]


def _bn(c: int, seed: int) -> torch.nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))  # negative scales too: decreasing predicates
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


@pytest.mark.parametrize("isa,backend", BACKENDS)
@pytest.mark.parametrize("c_in,c_out,stride,pad,act", [(16, 16, 1, 1, "none"), (70, 33, 2, 1, "leaky"),
                                                        (64, 130, 1, 0, "relu")])
def test_fused_epilogue_equals_unfused(isa, backend, c_in, c_out, stride, pad, act):
    g = torch.Generator().manual_seed(c_in + c_out)
    w = pack_signs(torch.randn(c_out, c_in, 3, 3, generator=g))
    x = torch.randn(2, c_in, 11, 15, generator=g)
    sc, bi = torch.rand(c_out, generator=g) + 0.1, torch.randn(c_out, generator=g)
    sc[0] = -sc[0]
    oh, ow = (11 + 2 * pad - 3) // stride + 1, (15 + 2 * pad - 3) // stride + 1
    r = torch.randn(2, c_out, oh, ow, generator=g)
    kw = dict(isa=isa, backend=backend)
    plain = xnor_conv2d(x, w, c_in, 3, stride, pad, -1.0, sc, bi, act, **kw)
    # residual + float and packed signs from one pass, packed padded for a +1-padded consumer
    f, p = xnor_conv2d(x, w, c_in, 3, stride, pad, -1.0, sc, bi, act, output="both", residual=r, out_padding=1,
                       out_pad_value=1.0, **kw)
    assert torch.equal(f, plain + r)
    assert torch.equal(p, pack_input(plain + r, 1, 1.0, backend="torch"))
    # bounds: the bits of the next layer's BatchNorm of the output, with and without the float map
    bn = _bn(c_out, 1)
    bounds = popcount_bounds(c_in, 3, sc, bi, act, lambda v: bn(v) >= 0)
    with torch.no_grad():
        ref = pack_input(bn(plain), 0, -1.0, backend="torch")
    f2, p2 = xnor_conv2d(x, w, c_in, 3, stride, pad, -1.0, sc, bi, act, output="both", packed_bounds=bounds, **kw)
    assert torch.equal(f2, plain) and torch.equal(p2, ref)
    p3 = xnor_conv2d(x, w, c_in, 3, stride, pad, -1.0, sc, bi, act, output="packed", packed_bounds=bounds, **kw)
    assert torch.equal(p3, ref)
    # a BatchNorm after the conv, tabulated by popcount, then the residual
    table = output_table(c_in, 3, sc, None, "none", bn, c_out)
    f4, p4 = xnor_conv2d(x, w, c_in, 3, stride, pad, -1.0, sc, None, "none", output="both", table=table,
                         residual=r, **kw)
    with torch.no_grad():
        ref4 = bn(xnor_conv2d(x, w, c_in, 3, stride, pad, -1.0, sc, None, "none", **kw)) + r
    assert torch.equal(f4, ref4) and torch.equal(p4, pack_input(ref4, 0, -1.0, backend="torch"))


def _mixed_fn(bn: torch.nn.BatchNorm2d, odd: tuple[int, ...]):
    """``bn`` except in channels ``odd``: a map no affine can match (|v| there)."""

    def fn(v):
        y = bn(v)
        y[:, list(odd)] = v[:, list(odd)].abs()
        return y

    return fn


@pytest.mark.parametrize("isa,backend", BACKENDS)
@pytest.mark.parametrize("c_in,c_out,stride,act", [(16, 16, 1, "none"), (70, 33, 2, "leaky"), (64, 130, 1, "none")])
def test_output_affine_equals_table(isa, backend, c_in, c_out, stride, act):
    """The BatchNorm after an XNOR conv as a fused multiply-add where it is one (checked at plan
    time against the table), table rows elsewhere: the same outputs as the full table and as the
    BatchNorm itself, on every ISA (hardware FMA) and the torch path (exact float64 emulation)."""
    g = torch.Generator().manual_seed(c_out)
    w = pack_signs(torch.randn(c_out, c_in, 3, 3, generator=g))
    x = torch.randn(2, c_in, 11, 15, generator=g)
    sc, bi = torch.rand(c_out, generator=g) * 0.1 + 0.01, torch.randn(c_out, generator=g)
    oh, ow = (11 + 2 - 3) // stride + 1, (15 + 2 - 3) // stride + 1
    r = torch.randn(2, c_out, oh, ow, generator=g)
    kw = dict(isa=isa, backend=backend)
    plain = xnor_conv2d(x, w, c_in, 3, stride, 1, -1.0, sc, bi, act, **kw)
    bn = _bn(c_out, 2)
    for fn, odd in [(bn, ()), (_mixed_fn(bn, (0, c_out - 1)), (0, c_out - 1))]:
        m = output_affine(c_in, 3, sc, bi, act, fn, c_out)
        full = output_table(c_in, 3, sc, bi, act, fn, c_out)
        assert m.a[list(odd)].isnan().all() and (m.table is None) == (m.affine_channels == c_out)
        if m.table is not None:  # only the tabulated channels' rows, in channel order
            assert torch.equal(m.table, full[m.a.isnan()])
        with torch.no_grad():
            ref = fn(plain.clone())
        for res in (None, r):
            out = ref if res is None else ref + res
            f, p = xnor_conv2d(x, w, c_in, 3, stride, 1, -1.0, sc, bi, act, output="both", table=m.table,
                               affine=(m.a, m.b), residual=res, out_padding=1, **kw)
            f_full = xnor_conv2d(x, w, c_in, 3, stride, 1, -1.0, sc, bi, act, table=full, residual=res, **kw)
            assert torch.equal(f, out) and torch.equal(f_full, out)
            assert torch.equal(p, pack_input(out, 1, -1.0, backend="torch"))


def test_output_affine_decision():
    """Which channels run as ``fma(v, a, b)``: all of an exact affine map and of torch's BatchNorm
    where it is one (this build: an FMA); none where the map is another form."""
    c_in, c_out, sc = 64, 24, torch.rand(24) * 0.01 + 0.001
    exact = output_affine(c_in, 3, sc, None, "none", lambda v: v * 2.0 + 0.5, c_out)
    assert exact.affine_channels == c_out and exact.table is None
    assert torch.equal(exact.a, torch.full((c_out,), 2.0)) and torch.equal(exact.b, torch.full((c_out,), 0.5))
    # two roundings (mul, then add) with coefficients that are not powers of two: no single fma matches
    a = torch.rand(c_out) + 0.3
    twice = output_affine(c_in, 3, sc, None, "none", lambda v: v * a.view(1, -1, 1, 1) + 0.1, c_out)
    assert twice.affine_channels < c_out and twice.table.shape == (c_out - twice.affine_channels, c_in * 9 + 1)
    bn = _bn(c_out, 3)
    m = output_affine(c_in, 3, sc, None, "none", bn, c_out)
    v = torch.randn(1, c_out, 5, 7)
    with torch.no_grad():
        fma_form = torch.equal(bn(v), _fma32(v, m.a.nan_to_num().view(1, -1, 1, 1),
                                             m.b.view(1, -1, 1, 1)))
    if fma_form:  # torch's BatchNorm is fma(x, alpha, beta) here: every channel affine
        assert m.affine_channels == c_out and m.table is None


def test_fma32_rounds_once():
    """The torch path's fused multiply-add (float64 with a two-sum error term) equals the exactly
    rounded result, also where the float64 sum lands on a float32 midpoint."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    v, a = torch.randn(4000, generator=g), torch.randn(4000, generator=g)
    b = (-(v.double() * a.double()) + torch.randn(4000, generator=g, dtype=torch.float64)).float()
    # v*a = half an ulp of b (+- a tiny part), b in [1, 2): sums on and near float32 midpoints
    k = torch.arange(600)
    v2 = (2.0 ** -24 + 2.0 ** -60 * (k % 7 - 3).double()).float()
    a2 = (1.0 + (k % 3).double() * 2.0 ** -23).float()
    b2 = (1.0 + k.double() * 2.0 ** -20).float()
    v, a, b = torch.cat([v, v2]), torch.cat([a, a2]), torch.cat([b, b2])
    got = _fma32(v, a, b)
    for i in range(v.numel()):
        x = Fraction(v[i].item()) * Fraction(a[i].item()) + Fraction(b[i].item())
        f = torch.tensor(float(x), dtype=torch.float32)
        cands = [torch.nextafter(f, torch.tensor(-float("inf"))), f, torch.nextafter(f, torch.tensor(float("inf")))]
        best = min(cands, key=lambda c: (abs(Fraction(c.item()) - x), int(c.view(torch.int32)) & 1))
        assert got[i].item() == best.item(), i


def test_fused_epilogue_refuses_bad_combinations():
    w = pack_signs(torch.randn(8, 8, 3, 3))
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="residual"):
        xnor_conv2d(x, w, 8, 3, 1, 1, output="packed", residual=torch.zeros(1, 8, 5, 5))
    with pytest.raises(ValueError, match="residual must be"):
        xnor_conv2d(x, w, 8, 3, 1, 1, output="both", residual=torch.zeros(1, 8, 4, 5))
    b = (torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="packed_bounds"):
        xnor_conv2d(x, w, 8, 3, 1, 1, output="float", packed_bounds=b)
    with pytest.raises(ValueError, match="table"):
        xnor_conv2d(x, w, 8, 3, 1, 1, output="float", table=torch.zeros(8, 10))
    a = torch.ones(8)
    a[3] = float("nan")  # one tabulated channel: a table of one row
    with pytest.raises(ValueError, match=r"table must be \(1, 73\)"):
        xnor_conv2d(x, w, 8, 3, 1, 1, output="float", affine=(a, torch.zeros(8)), table=torch.zeros(8, 73))
    with pytest.raises(ValueError, match="affine coefficients"):
        xnor_conv2d(x, w, 8, 3, 1, 1, output="float", affine=(torch.ones(7), torch.zeros(7)))


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("channels", [(16, 16), (70, 33, 5), (64, 64), (64, 130, 1), (96, 64), (200,)])
def test_concat_packed_equals_packed_concat(channels, backend):
    """The packed concat (C++ one pass, and the torch path) equals packing the float concat, padded
    or not: word copies where a part starts on a 64-channel boundary, shifts elsewhere."""
    g = torch.Generator().manual_seed(len(channels))
    parts = [torch.randn(2, c, 4, 6, generator=g) for c in channels]
    packed = [(pack_input(p, 0, -1.0, backend="torch"), p.shape[1]) for p in parts]
    for pad, value in [(0, -1.0), (1, 1.0), (2, -1.0)]:
        got = concat_packed(packed, pad, value, backend=backend)
        assert torch.equal(got, pack_input(torch.cat(parts, 1), pad, value, backend="torch")), (pad, value)
    assert torch.equal(PackedOps(backend).concat_packed(packed), concat_packed(packed, backend="torch"))
    # float parts binarized inside the concat (x >= 0: zeros too), mixed with packed ones
    parts[0][:, :, 0] = 0.0
    mixed = [(p, p.shape[1]) if i % 2 == 0 else q for i, (p, q) in enumerate(zip(parts, packed))]
    assert torch.equal(concat_packed(mixed, 1, -1.0, backend=backend), pack_input(torch.cat(parts, 1), 1, -1.0,
                                                                                  backend="torch"))


def _bn_sign(bn):
    return lambda v: bn(v) >= 0


@pytest.mark.parametrize("backend", [None, "torch"])
def test_sign_thresholds_pack_a_batchnorm_exactly(backend):
    """bn(x) >= 0 as per-channel thresholds of the packer (x >= t, or x <= t for a negative scale):
    the concat's bits of a float part equal packing the BatchNorm's output, specials included."""
    c = 70
    bn = _bn(c, 7)  # negative scales too
    with torch.no_grad():
        bn.weight[5] = 0.0  # constant: bn(x) = beta < 0 for finite x, NaN at +-inf: never +1
        bn.bias[5] = -abs(bn.bias[5]) - 0.1
    thr = sign_thresholds(_bn_sign(bn), c)
    assert thr is not None and thr[1].bool().any() and not thr[1].bool().all()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, c, 5, 9, generator=g) * 4
    x[0, :, 0, 0] = float("inf")
    x[0, :, 0, 1] = -float("inf")
    x[0, :, 0, 2] = float("nan")
    x[1, :, 1, 1] = bn.running_mean  # at the boundary
    other = torch.randn(2, 12, 5, 9, generator=g)
    with torch.no_grad():
        ref = pack_input(torch.cat([other, bn(x)], 1), 1, 1.0, backend="torch")
    got = concat_packed([(pack_input(other, 0, -1.0, backend="torch"), 12), (x, c, thr)], 1, 1.0, backend=backend)
    assert torch.equal(got, ref)
    with torch.no_grad():  # one float part alone: packed straight into the padded output rows
        assert torch.equal(concat_packed([(x, c, thr)], 1, 1.0, backend=backend), pack_input(bn(x), 1, 1.0,
                                                                                            backend="torch"))
    assert torch.equal(concat_packed([(x, c)], 2, -1.0, backend=backend), pack_input(x, 2, -1.0, backend="torch"))
    with torch.no_grad():  # a zero scale with beta >= 0: +1 for finite x but not at +-inf: no threshold
        bn.bias[5] = 0.5
    assert sign_thresholds(_bn_sign(bn), c) is None


# ----------------------------------------------------------------------------- the students

CASES = {
    "bireal-small": ("bireal", {"preset": "small"}),
    # channels not multiples of 64 everywhere, a two-conv head
    "bireal-odd": ("bireal", {"preset": "small", "widths": [16, 70, 70, 130], "units": [1, 2, 2, 2],
                              "head_depth": 2}),
    "binary_densenet-small": ("binary_densenet", {"preset": "small"}),
    # a three-layer block: older layers' outputs packed through bn_l slices
    "binary_densenet-deep": ("binary_densenet", {"preset": "small", "blocks": [1, 3, 2, 2], "growth": [16, 20, 24, 32]}),
}


@pytest.fixture(scope="module", params=list(CASES))
def chained(request, tmp_path_factory):
    family, opts = CASES[request.param]
    student, extra = _family_student(family, opts, None)
    path = tmp_path_factory.mktemp("chain") / f"{request.param}.kdbnn"
    export(student, path, extra_meta=extra)
    return request.param, student, path


def test_chaining_on_equals_off_and_torch(chained):
    case, student, path = chained
    on, off = Runtime(path), Runtime(path, packed_chains=False)
    ref_torch = Runtime(path, backend="torch", packed_chains=False)
    on_torch = Runtime(path, backend="torch")
    assert on.packed_plan is not None and on.packed_plan.packed_in and off.packed_plan is None
    x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    a, b = on(x), off(x)
    assert torch.equal(a[0], b[0]), case  # XNOR bits identical, float parts the same float ops
    assert _rel_err(on_torch(x)[0], ref_torch(x)[0]) < 1e-5
    assert _rel_err(a[0], ref_torch(x)[0]) < 1e-5
    with torch.no_grad():
        assert _rel_err(a[0], student(x)[0]) < 1e-4


def test_densenet_negative_batchnorm_scales_chain_exactly(tmp_path):
    """Dense layers' BatchNorms with negative scales: older parts binarized with x <= t thresholds."""
    student, extra = _family_student("binary_densenet", {"preset": "small", "blocks": [1, 3, 2, 2]}, None)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight[::3] *= -1
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    on, off = Runtime(tmp_path / "m.kdbnn"), Runtime(tmp_path / "m.kdbnn", packed_chains=False)
    spec = on.packed_plan.blocks["block2"][2]
    assert spec["thr_parts"] is not None and any(le.bool().any() for _, le in spec["thr_parts"])
    x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(6))
    assert torch.equal(on(x)[0], off(x)[0])


def test_bireal_plan_chains_every_unit_after_the_first(tmp_path):
    student, extra = _family_student("bireal", {"preset": "small"}, None)
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    plan = Runtime(tmp_path / "m.kdbnn").packed_plan
    units = ["backbone.stage2.0", "backbone.stage3.0", "backbone.stage3.1", "backbone.stage4.0", "backbone.stage4.1"]
    assert set(plan.packed_in) == {f"{u}.bconv" for u in units} | {"head.conv3.bconv"}
    assert "stem" in plan.float_in["backbone.stage1.0.bconv"]
    assert "bn_in" in plan.float_in["head.conv1.bconv"]
    # every unit but the last hands the next one packed words; each unit's BN is tabulated
    assert [p for p, nxt in plan.units.items() if nxt is None] == ["backbone.stage4.1"]
    assert set(plan.tables) == {"backbone.stage1.0", *units}


def test_densenet_plan_reads_packed_concats_and_says_when_shifted(tmp_path):
    student, extra = _family_student("binary_densenet", {"preset": "small"}, None)
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    plan = Runtime(tmp_path / "m.kdbnn").packed_plan
    packed = {f"backbone.block{b}.layers.1.bconv" for b in (2, 3, 4)} | {"head.conv3.bconv"}
    assert set(plan.packed_in) == packed
    for b in (1, 2, 3, 4):
        assert "first layer" in plan.float_in[f"backbone.block{b}.layers.0.bconv"]
    # growth 16..32 and block inputs of 16..32 channels: no part starts on a word boundary
    assert all("shifted" in plan.packed_in[p] for p in packed)


def test_densenet_word_aligned_parts(tmp_path):
    opts = {"preset": "small", "stem_channels": 64, "growth": [64, 64, 64, 64], "round_to": 64, "reduction": 1.0,
            "head_channels": 128}
    student, extra = _family_student("binary_densenet", opts, None)
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    on, off = Runtime(tmp_path / "m.kdbnn"), Runtime(tmp_path / "m.kdbnn", packed_chains=False)
    assert "word-aligned" in on.packed_plan.packed_in["backbone.block2.layers.1.bconv"]
    x = torch.rand(1, 3, *SIZE)
    assert torch.equal(on(x)[0], off(x)[0])


def test_bwn_students_have_no_packed_plan(tmp_path):
    student, extra = _family_student("bireal", {"preset": "small", "mode": "bwn"}, None)
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    assert Runtime(tmp_path / "m.kdbnn").packed_plan is None


# ----------------------------------------------------------------------------- the float stem


def test_plain_sequential_stem_fuses_conv_act_and_pool():
    """A float ``conv -> [folded BN] -> act -> MaxPool2d(2, 2)`` in a plain Sequential runs as one
    stem kernel call (activation and pool fused); pools of another geometry stay torch modules."""
    from kd_bnn.deploy.runtime import StemConv, _fuse_sequential

    torch.manual_seed(0)

    def stem(pool: torch.nn.Module, c_in: int = 3) -> torch.nn.Sequential:
        conv = torch.nn.Conv2d(c_in, 8, 3, 2, 1)
        return torch.nn.Sequential(conv, torch.nn.Identity(), torch.nn.ReLU(inplace=True), pool).eval()

    x = torch.randn(2, 3, 27, 35)  # odd sizes: the pool drops the last row and column
    for pool, fused in [(torch.nn.MaxPool2d(2, 2), True), (torch.nn.MaxPool2d(2), True),
                        (torch.nn.MaxPool2d(2, 2, padding=1), False), (torch.nn.MaxPool2d(2, 2, ceil_mode=True), False),
                        (torch.nn.MaxPool2d(3, 2), False)]:
        m = stem(pool)
        with torch.no_grad():
            ref = m(x)
        assert _fuse_sequential(m, None) == 1
        assert isinstance(m[0], StemConv) and isinstance(m[2], torch.nn.Identity)
        assert (m[0].pool == 0) == fused and isinstance(m[3], torch.nn.Identity) == fused
        with torch.no_grad():
            got = m(x)
        assert got.shape == ref.shape and _rel_err(got, ref) < 1e-5, pool
    wide = stem(torch.nn.MaxPool2d(2, 2), c_in=16)  # not a stem: C_in > 8
    assert _fuse_sequential(wide, None) == 0 and type(wide[0]) is torch.nn.Conv2d


@pytest.mark.parametrize("family", ["bireal", "binary_densenet"])
def test_student_stem_on_the_stem_kernel_with_its_pool(family, tmp_path):
    from kd_bnn.deploy.runtime import StemConv

    student, extra = _family_student(family, {"preset": "small"}, None)
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    rt = Runtime(tmp_path / "m.kdbnn")
    stem = rt.model.backbone.stem
    assert isinstance(stem.conv, StemConv) and stem.conv.activation == "relu" and stem.conv.pool == 0
    assert all(isinstance(stem.get_submodule(k), torch.nn.Identity) for k in ("bn", "act", "pool"))
    x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    unfused = Runtime(tmp_path / "m.kdbnn", fuse=False, packed_chains=False)
    assert _rel_err(rt(x)[0], unfused(x)[0]) < 1e-5
    with torch.no_grad():
        assert _rel_err(rt(x)[0], student(x)[0]) < 1e-4


def test_remaining_plain_pools_run_as_strided_maxima(tmp_path):
    """``nn.MaxPool2d(2, 2)`` the stem kernel does not take (BinaryDenseNet's transitions) runs as
    `MaxPool2x2`: the same maxima (NaN propagated alike), odd sizes included."""
    from kd_bnn.deploy.runtime import MaxPool2x2

    g = torch.Generator().manual_seed(5)
    for shape in [(2, 5, 7, 9), (1, 3, 2, 2), (1, 64, 24, 80)]:
        x = torch.randn(*shape, generator=g)
        x.view(-1)[3] = float("nan")
        got, ref = MaxPool2x2()(x), torch.nn.MaxPool2d(2, 2)(x)
        assert got.shape == ref.shape and torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0))
    student, extra = _family_student("binary_densenet", {"preset": "small"}, None)
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    rt = Runtime(tmp_path / "m.kdbnn")
    assert isinstance(rt.model.backbone.trans1.pool, MaxPool2x2)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in rt.model.modules())
