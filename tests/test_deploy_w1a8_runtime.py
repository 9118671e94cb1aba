"""W1A8 in the .kdbnn path: calibration, export (format version 3), the runtime's int8 layers and
int8 chains between them, and refusal of what a reader cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_bnn.binary import binarize
from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.deploy import format as fmt
from kd_bnn.deploy.export import ExportError, export
from kd_bnn.deploy.format import FormatError, load_container, save_container
from kd_bnn.deploy.quantize import QMAX, calibrate_activations, inverse_scale, w1a8_reason
from kd_bnn.models.darknet.model import load_darknet

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def _student(mode: str = "bwn") -> nn.Module:
    torch.manual_seed(0)
    m = load_darknet("configs/darknet/yolov2-demo.cfg", class_names=CLASSES, input_size=(64, 192))
    m, _ = binarize(m, {"mode": mode})
    # BN statistics that are not the identity, so the folded scale and shift matter
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 64, 192, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def w1a8_file(tmp_path_factory):
    student = _student()
    scales, n = calibrate_activations(student, [_images()])
    path = tmp_path_factory.mktemp("w1a8") / "m.kdbnn"
    export(student, path, act_scales=scales, calibration_images=n)
    return student, scales, path


def _fake_quant_student(student: nn.Module, scales: dict[str, float]) -> list:
    """Hooks that quantize each W1A8 conv's input as the runtime does (in float)."""
    handles = []
    for path, m in student.named_modules():
        if path in scales:
            s = scales[path]
            inv = inverse_scale(s)
            handles.append(m.register_forward_pre_hook(
                lambda _m, a, s=s, inv=inv: (torch.round(a[0] * inv).clamp(-QMAX, QMAX) * s,)))
    return handles


def test_calibration_scales_are_the_input_absmax_over_127():
    student = _student()
    convs = {p for p, m in student.named_modules() if isinstance(m, BinaryConv2d)}
    seen: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, p=p: seen.__setitem__(p, max(seen.get(p, 0.0),
                                                                                   float(a[0].abs().max()))))
             for p, m in student.named_modules() if p in convs]
    with torch.no_grad():
        student(_images(2, 1))
        student(_images(3, 2))
    for h in hooks:
        h.remove()
    scales, n = calibrate_activations(student, [_images(2, 1), _images(3, 2)])
    assert n == 5 and set(scales) == convs  # every bwn conv of the demo net is W1A8-capable
    for p, s in scales.items():
        assert s == pytest.approx(seen[p] / QMAX, rel=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        calibrate_activations(student, [])


def test_w1a8_reason_names_what_cannot_run():
    assert "xnor" in w1a8_reason(_student("xnor").get_submodule("layers.2.conv"))
    assert w1a8_reason(nn.Conv2d(3, 3, 3)) == "not a binary conv"


def test_export_writes_version_3_with_scales(w1a8_file):
    _, scales, path = w1a8_file
    blob = path.read_bytes()
    assert b'"format_version":"3"' in blob
    _, meta = load_container(path)
    assert meta["activations"] == {"bits": 8, "calibration_images": 4, "statistic": "max"}
    got = {e["path"]: e["act_scale"] for e in meta["layers"] if "act_scale" in e}
    assert set(got) == set(scales)
    for p, s in got.items():
        assert float(torch.tensor(s, dtype=torch.float32)) == scales[p]


def test_export_refuses_scales_on_convs_that_cannot_run_w1a8(tmp_path):
    xnor = _student("xnor")
    with pytest.raises(ExportError, match="cannot run with 8-bit activations"):
        export(xnor, tmp_path / "x.kdbnn", act_scales={"layers.2.conv": 0.1})
    with pytest.raises(ExportError, match="positive finite"):
        export(_student(), tmp_path / "y.kdbnn", act_scales={"layers.2.conv": -1.0})
    assert not (tmp_path / "x.kdbnn").exists() and not (tmp_path / "y.kdbnn").exists()


@pytest.mark.parametrize("backend", [None, "torch"])
def test_runtime_equals_the_student_with_quantized_inputs(w1a8_file, backend):
    """The runtime's int8 layers compute the student with each W1A8 conv's input quantized (and
    exact integer sums): the same maps up to float rounding."""
    from kd_bnn.deploy.runtime import Runtime

    student, scales, path = w1a8_file
    rt = Runtime(path, backend=backend)
    assert sum(getattr(m, "act_scale", None) is not None for m in rt.model.modules()) == len(scales)
    x = _images(2, 7)
    handles = _fake_quant_student(student, scales)
    try:
        with torch.no_grad():
            want = student(x)
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(rt(x), want):
        assert a.shape == b.shape
        # a product near a rounding boundary may quantize one step apart: tiny, local differences
        assert (a - b).abs().max().item() <= 2e-3 * max(1.0, b.abs().max().item())
        assert (a - b).abs().mean().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_int8_chains_between_w1a8_layers_are_exact(w1a8_file):
    """Consecutive W1A8 blocks (directly or through a max-pool) pass int8 in the consumer's scale:
    identical maps to each layer quantizing its own float input (max commutes with the
    monotone quantizer; the integer parts are exact)."""
    from kd_bnn.deploy.runtime import Runtime

    _, _, path = w1a8_file
    chained, plain = Runtime(path), Runtime(path, packed_chains=False)
    assert chained.packed_plan.int8, "the demo net has consecutive W1A8 blocks"
    x = _images(2, 3)
    for a, b in zip(chained(x), plain(x)):
        assert torch.equal(a, b)


def test_w1a8_file_is_refused_by_a_reader_without_the_mode(w1a8_file, monkeypatch):
    """A reader of format 2 (no 8-bit activations) refuses the file with the upgrade message
    instead of running the convs some other way."""
    from kd_bnn.deploy.runtime import Runtime

    _, _, path = w1a8_file
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)
    with pytest.raises(FormatError, match="format version 3 is newer than this kd_bnn supports.*upgrade"):
        Runtime(path)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["activations"].update(bits=4), "activations.bits"),
    (lambda m: m["activations"].update(trust=True), "expected keys"),
    (lambda m: m["activations"].update(statistic="mse"), "activations.statistic"),
    (lambda m: m.pop("activations"), "no 'activations' section"),
    (lambda m: next(e for e in m["layers"] if "act_scale" in e).update(act_scale=-0.5), "positive finite"),
    (lambda m: next(e for e in m["layers"] if "act_scale" in e).update(act_scale="1e-2"), "positive finite"),
    (lambda m: next(e for e in m["layers"] if e["kind"] == "float_conv").update(act_scale=0.1), "only binary convs"),
    (lambda m: next(e for e in m["layers"] if "act_scale" in e).update(mode="xnor"), "W1A8 kernel does not run"),
])
def test_hostile_activation_metadata_is_refused(w1a8_file, tmp_path, edit, match):
    from kd_bnn.deploy.runtime import Runtime

    _, _, path = w1a8_file
    tensors, meta = load_container(path)
    tensors.pop(fmt.META_TENSOR, None)
    edit(meta)
    bad = tmp_path / "bad.kdbnn"
    save_container(bad, tensors, meta, version=3)
    with pytest.raises(FormatError, match=match) as e:
        Runtime(bad)
    assert str(bad) in str(e.value)
