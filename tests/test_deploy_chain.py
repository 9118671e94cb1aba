"""Packed-activation chaining of the binary-friendly students (Bi-Real-YOLO, BinaryDenseNet-YOLO):
the fused XNOR epilogue (residual, float + packed, popcount bounds, output table), the packed concat,
the plans, and the runtime with chaining on equal to chaining off and to the torch backend."""

from __future__ import annotations

import pytest
import torch
from test_deploy_runtime import SIZE, _family_student, _rel_err

from kd_bnn.deploy.export import export
from kd_bnn.deploy.kernels import (
    available_isas,
    output_table,
    pack_input,
    popcount_bounds,
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


@pytest.mark.parametrize("channels", [(16, 16), (70, 33, 5), (64, 64), (64, 130, 1), (96, 64)])
def test_concat_packed_equals_packed_concat(channels):
    g = torch.Generator().manual_seed(len(channels))
    parts = [torch.randn(2, c, 4, 6, generator=g) for c in channels]
    ops = PackedOps("torch")
    got = ops.concat_packed([(pack_input(p, 0, -1.0, backend="torch"), p.shape[1]) for p in parts])
    assert torch.equal(got, pack_input(torch.cat(parts, 1), 0, -1.0, backend="torch"))


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
