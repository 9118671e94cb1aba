"""Binary-friendly students (BinaryDenseNet-YOLO, Bi-Real-YOLO) and stride-matched distillation taps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.binary import BinaryConv2d, binarize, binary_convs, summary
from kd_bnn.config import load_config
from kd_bnn.models import DETECTORS, build_detector
from kd_bnn.models.binary_students import (
    BIREAL_PRESETS,
    DENSENET_PRESETS,
    BiRealUnit,
    DenseBlock,
    StudentConfigError,
)
from kd_bnn.models.darknet.model import random_weights_
from kd_bnn.models.students_taps import (
    TapStrideError,
    check_tap_pairs,
    match_taps_by_stride,
    tap_strides,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Car", "Pedestrian", "Cyclist"]
SMALL = (96, 320)
FAMILIES = ["binary_densenet", "bireal"]
STUDENT_POLICY = {"mode": "xnor", "include": ["re:.*bconv"]}


def _small(family: str, **kw):
    torch.manual_seed(0)
    return build_detector(family, class_names=CLASSES, input_size=SMALL, preset="small", **kw)


def _teacher(size=SMALL):
    t = build_detector("darknet", cfg="yolov2-demo", class_names=CLASSES, input_size=size)
    return random_weights_(t, seed=1).eval()


def test_registered():
    assert {"binary_densenet", "bireal"} <= set(DETECTORS.list())


@pytest.mark.parametrize("mode", ["xnor", "bwn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_small_shapes_every_stride(family, mode):
    model = _small(family, mode=mode)
    strides = tap_strides(model, SMALL)
    for name, s in (("stride8", 8), ("stride16", 16), ("stride32", 32)):
        stride, shape = strides[name]
        assert stride == s and shape[-2:] == (SMALL[0] // s, SMALL[1] // s), (name, shape)
    model.train()
    raw = model(torch.rand(2, 3, *SMALL))
    assert len(raw) == 1 and raw[0].shape == (2, 5 * (5 + 3), SMALL[0] // 32, SMALL[1] // 32)
    assert all(m.mode == mode for m in binary_convs(model).values())
    assert model.prediction_convs() == ["head.pred"] and not isinstance(
        model.head.pred, BinaryConv2d
    )


def _densenet_params(p: dict, num_out: int) -> int:
    """Parameter count of a BinaryDenseNet-YOLO written out layer by layer (plain reference)."""
    growth = p["growth"] if isinstance(p["growth"], (list, tuple)) else [p["growth"]] * 4
    red = p["reduction"] if isinstance(p["reduction"], (list, tuple)) else [p["reduction"]] * 3
    c = p["stem_channels"]
    n = 3 * c * p["stem_kernel"] ** 2 + 2 * c
    c16 = 0
    for i, depth in enumerate(p["blocks"]):
        for _ in range(depth):
            n += 2 * c + c * growth[i] * 9
            c += growth[i]
        if i == 2:
            c16 = c
        if i < 3:
            c_out = int(round(c / red[i] / p["round_to"])) * p["round_to"]
            n += 2 * c + c * c_out
            c = c_out
    n += 2 * c  # post BN
    hc, pc = p["head_channels"], p["passthrough_channels"]
    n += c16 * pc + 2 * pc  # passthrough conv + BN
    for c_in in (c, hc + 4 * pc):  # binary head blocks: BN in, conv, BN out
        n += 2 * c_in + c_in * hc * 9 + 2 * hc
    return n + hc * num_out + num_out


def _bireal_params(p: dict, num_out: int) -> int:
    c = p["stem_channels"]
    n = 3 * c * p["stem_kernel"] ** 2 + 2 * c
    c16 = 0
    for i, (w, units) in enumerate(zip(p["widths"], p["units"])):
        for j in range(units):
            n += c * w * 9 + 2 * w
            if (i > 0 and j == 0) or c != w:
                n += c * w + 2 * w  # avg-pool + 1x1 conv + BN shortcut
            c = w
        if i == 2:
            c16 = c
    hc, pc = p["head_channels"], p["passthrough_channels"]
    n += c16 * pc + 2 * pc
    for c_in in (c, hc + 4 * pc):
        n += 2 * c_in + c_in * hc * 9 + 2 * hc
    return n + hc * num_out + num_out


@pytest.mark.parametrize(
    "family, presets, ref",
    [
        ("binary_densenet", DENSENET_PRESETS, _densenet_params),
        ("bireal", BIREAL_PRESETS, _bireal_params),
    ],
)
def test_preset_param_counts(family, presets, ref):
    counts = {}
    for name, p in presets.items():
        size = (384, 1248) if name == "darknet19" else SMALL  # built only: no forward at 384x1248
        model = build_detector(family, class_names=CLASSES, input_size=size, preset=name)
        counts[name] = n = sum(t.numel() for t in model.parameters())
        assert n == ref(p, 5 * (5 + 3)), (family, name)
        n_bin = len(binary_convs(model))
        layers = sum(p["blocks"]) if family == "binary_densenet" else sum(p["units"])
        assert n_bin == layers + 2  # backbone binary convs + 2 binary head convs
    # DarkNet-19-cost presets: 14.7 M (BinaryDenseNet-37) and 27.1 M (Bi-Real-34) parameters
    n = counts["darknet19"]
    assert (14e6 < n < 15e6) if family == "binary_densenet" else (26e6 < n < 28e6), n


@pytest.mark.parametrize("mode", ["xnor", "bwn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_every_binary_latent_weight(family, mode):
    model = _small(family, mode=mode).train()
    images = torch.rand(2, 3, *SMALL)
    targets = torch.tensor([[0, 0, 8.0, 8.0, 120.0, 80.0], [1, 1, 200.0, 10.0, 240.0, 90.0]])
    total, _ = model.loss(model(images), targets)
    total.backward()
    convs = binary_convs(model)
    assert convs
    for name, m in convs.items():
        g = m.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_dense_block_matches_plain_reference():
    torch.manual_seed(0)
    opts = dict(mode="xnor", weight_scaling="none", clip=1.3, pad_value=1.0)
    block = DenseBlock(5, 2, 3, opts, "none").eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 6, 7)
    ref = x
    for layer in block.layers:
        bn, conv = layer.bn, layer.bconv
        h = F.batch_norm(
            ref, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        hb = F.pad(torch.where(h >= 0, 1.0, -1.0), (1, 1, 1, 1), value=1.0)
        y = F.conv2d(hb, torch.where(conv.weight >= 0, 1.0, -1.0))
        ref = torch.cat([ref, y], 1)
    torch.testing.assert_close(block(x), ref)
    assert block.out_channels == 11


def test_bireal_unit_matches_plain_reference():
    torch.manual_seed(0)
    unit = BiRealUnit(
        4, 6, 2, dict(mode="xnor", weight_scaling="mean_abs", input_quantizer="approx_sign"), "none"
    ).eval()
    x = torch.randn(2, 4, 8, 10)
    w = unit.bconv.weight
    wb = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
    xb = F.pad(torch.where(x >= 0, 1.0, -1.0), (1, 1, 1, 1), value=-1.0)
    main = unit.bn(F.conv2d(xb, wb, stride=2))
    short = unit.shortcut.bn(F.conv2d(F.avg_pool2d(x, 2), unit.shortcut.conv.weight))
    torch.testing.assert_close(unit(x), main + short)
    same = BiRealUnit(4, 4, 1, dict(mode="xnor"), "none").eval()
    assert isinstance(same.shortcut, nn.Identity)
    torch.testing.assert_close(same(x) - x, same.bn(same.bconv(x)))


def test_options_reach_binary_layers():
    model = _small("binary_densenet", pad_value=1.0, weight_scaling="mean_abs", clip=1.0)
    convs = binary_convs(model).values()
    assert all(
        m.pad_value == 1.0 and m.weight_scaling == "mean_abs" and m.clip == 1.0 for m in convs
    )
    default = _small("binary_densenet")  # BinaryDenseNet: no scaling factors, clip 1.3
    assert all(m.weight_scaling == "none" and m.clip == 1.3 for m in binary_convs(default).values())
    bireal = _small("bireal")
    assert all(
        type(m.input_quantizer).__name__ == "ApproxSign" and m.weight_scaling == "mean_abs"
        for m in binary_convs(bireal).values()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_binarize_is_a_no_op(family):
    model = _small(family)
    before = {n: id(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model2, report = binarize(model, STUDENT_POLICY)
    assert model2 is model and {n: id(m) for n, m in model.named_modules()} == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    reasons = {r.path: r.reason for r in report.rows}
    assert {p for p, r in reasons.items() if r == "already binary"} == set(binary_convs(model))
    assert {p for p, r in reasons.items() if r != "already binary"} == set(model.float_convs())
    assert all(
        r == "not included by policy" for p, r in reasons.items() if p in model.float_convs()
    )
    # converting twice changes nothing either
    _, again = binarize(model, STUDENT_POLICY)
    assert [r.reason for r in again.rows] == [r.reason for r in report.rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_compression(family, capsys):
    model = _small(family)
    tot = summary(model, SMALL, print_fn=print)["totals"]
    out = capsys.readouterr().out
    assert "compression" in out.lower() or "x" in out
    assert tot["compression"] > 5 and tot["binary_mac_fraction"] > 0.4
    assert tot["num_binary_layers"] == len(binary_convs(model))


def test_bad_growth_and_reduction_name_the_layer():
    with pytest.raises(StudentConfigError, match=r"backbone\.block1\.layers\.0\.bconv.*growth"):
        _small("binary_densenet", growth=0)
    with pytest.raises(StudentConfigError, match=r"backbone\.block3\.layers\.0\.bconv"):
        _small("binary_densenet", growth=[16, 16, -4, 32])
    with pytest.raises(StudentConfigError, match=r"backbone\.trans2\.conv.*0 output channels"):
        _small("binary_densenet", reduction=[2.0, 1000.0, 2.0])
    with pytest.raises(StudentConfigError, match=r"backbone\.trans1\.conv.*positive"):
        _small("binary_densenet", reduction=0)
    with pytest.raises(StudentConfigError, match=r"backbone\.stage2\.0\.bconv"):
        _small("bireal", widths=[16, 0, 64, 128])
    with pytest.raises(StudentConfigError, match=r"backbone\.block2"):
        _small("binary_densenet", blocks=[1, 0, 2, 2])
    with pytest.raises(StudentConfigError, match="presets"):
        build_detector("bireal", class_names=CLASSES, input_size=SMALL, preset="huge")
    with pytest.raises(StudentConfigError, match="mode"):
        _small("bireal", mode="ternary")
    with pytest.raises(ValueError, match="multiples of the network stride 32"):
        build_detector("bireal", class_names=CLASSES, input_size=(100, 320), preset="small")


def test_match_taps_by_stride_and_mismatch_error():
    teacher = _teacher()
    student = _small("binary_densenet")
    pairs = match_taps_by_stride(teacher, student, SMALL)
    assert pairs == [
        ("stride8", "stride8", 8),
        ("stride16", "stride16", 16),
        ("stride32", "stride32", 32),
    ]
    # a module path on one side is fine
    assert (
        check_tap_pairs(teacher, student, [(teacher.taps["stride16"], "stride16")], SMALL)[0][2]
        == 16
    )
    with pytest.raises(TapStrideError) as exc:
        check_tap_pairs(teacher, student, [{"teacher": "stride16", "student": "stride32"}], SMALL)
    msg = str(exc.value)
    assert "'stride16'" in msg and "'stride32'" in msg and "stride 16" in msg and "stride 32" in msg
    assert teacher.taps["stride16"] in msg and student.taps["stride32"] in msg
    with pytest.raises(ValueError, match="closest"):
        check_tap_pairs(teacher, student, [("stride16", "stride61")], SMALL)


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_shape_distillation_step_reduces_mimic(family):
    distill = pytest.importorskip("kd_bnn.distill", reason="kd_bnn.distill not importable yet")
    torch.manual_seed(0)
    teacher = _teacher()
    student = _small(family)
    terms = [
        {
            "loss": "mimic_l2",
            "teacher": "stride16",
            "student": "stride16",
            "options": {"normalize": True},
        },
        {
            "loss": "mimic_l2",
            "teacher": "stride32",
            "student": "stride32",
            "options": {"normalize": True},
        },
    ]
    check_tap_pairs(teacher, student, terms, SMALL)
    kd = distill.Distiller(teacher, student, terms, det_weight=0.0).train()
    assert any(
        isinstance(a, nn.Module) and any(True for _ in a.parameters()) for a in kd.adapters.values()
    )
    opt = torch.optim.Adam(list(student.parameters()) + kd.trainable_parameters(), lr=3e-3)
    images = torch.rand(4, 3, *SMALL)
    targets = torch.tensor([[0, 0, 8.0, 8.0, 120.0, 80.0]])

    def mimic() -> float:
        kd.eval()
        with torch.no_grad():
            _, _, parts = kd(images, targets)
        kd.train()
        return sum(float(v) for k, v in parts.items() if k.startswith("kd/"))

    before = mimic()
    for _ in range(8):
        _, loss, _ = kd(images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mimic()
    assert math.isfinite(before) and after < 0.9 * before, (before, after)
    kd.remove_taps()


@pytest.mark.parametrize(
    "path",
    [
        "configs/demo_binary_densenet.yaml",
        "configs/demo_bireal.yaml",
        "configs/kitti/binary_densenet_yolo_kt.yaml",
        "configs/kitti/bireal_yolo_xnor_kt.yaml",
    ],
)
def test_configs_build_and_pair_taps(path):
    cfg = load_config(REPO / path)
    sm = cfg.student.model
    assert sm.family in FAMILIES and cfg.student.init_from_teacher is False
    demo = "demo" in path
    size = SMALL if demo else tuple(cfg.data.input_size)
    student = build_detector(sm.family, class_names=cfg.data.classes, input_size=size, **sm.options)
    mode = sm.options.get("mode", "xnor")
    assert cfg.student.binary.mode == mode and all(
        m.mode == mode for m in binary_convs(student).values()
    )
    _, report = binarize(student, cfg.student.binary)
    assert not any(r.reason == "converted" for r in report.rows)
    terms = [t for t in cfg.distill.terms if t.teacher or t.student]
    assert {t.student for t in terms} == {"stride16", "stride32"}
    if demo:  # the small teacher and student: probe strides with a real forward
        teacher = build_detector(
            cfg.teacher.family,
            cfg=str(REPO / cfg.teacher.cfg),
            class_names=cfg.data.classes,
            input_size=size,
        )
        assert [p[2] for p in check_tap_pairs(teacher, student, terms, size)] == [16, 32]
    else:
        assert cfg.teacher.cfg.endswith("yolov2-kitti.cfg") and all(
            t.student in student.taps for t in terms
        )
