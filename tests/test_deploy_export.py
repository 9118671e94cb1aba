"""`.kdbnn` export: exact packed-size accounting, stored tensors, float-equivalent graph, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from toolload import load_tool
from torch import nn

from kd_bnn.binary import binarize
from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.binary.summary import conv_bn_pairs, float32_model_bytes, packed_model_bytes
from kd_bnn.deploy.export import ExportError, export
from kd_bnn.deploy.format import load_container, read_metadata
from kd_bnn.deploy.onnx import export_onnx, float_equivalent
from kd_bnn.deploy.pack import pack_signs
from kd_bnn.deploy.schema import BINARY_OPTIONS, bn_affine, build_skeleton, split_blobs, tensor_plan
from kd_bnn.engine.export import export_checkpoint
from kd_bnn.models.darknet.model import darknet, random_weights_

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Car", "Pedestrian", "Cyclist"]
SIZE = (96, 320)


def _student(mode: str = "bwn", **opts) -> nn.Module:
    teacher = random_weights_(darknet("yolov2-demo", class_names=CLASSES, input_size=SIZE), 0)
    student, _ = binarize(teacher, {"mode": mode, **opts})
    return student.eval()


def _stored(path, model=None) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{module path: {role: tensor}} of a file, cut by the plan of ``model`` (default: the skeleton
    rebuilt from the file, as the loader does)."""
    blobs, meta = load_container(path)
    tree = build_skeleton(meta) if model is None else model
    slots, totals = tensor_plan(tree, meta["layers"])
    return split_blobs(blobs, slots, totals), meta


@pytest.mark.parametrize("mode,opts", [("bwn", {}), ("xnor", {"pad_value": 1.0, "weight_scaling": "learned"})])
def test_tensor_bytes_equal_summary_prediction(tmp_path, mode, opts):
    s = _student(mode, **opts)
    rep = export(s, tmp_path / "m.kdbnn")
    assert rep["tensor_bytes"] == packed_model_bytes(s) == rep["predicted_packed_bytes"]
    assert rep["file_bytes"] == (tmp_path / "m.kdbnn").stat().st_size
    assert rep["file_bytes"] == rep["tensor_bytes"] + rep["header_bytes"]
    assert 0 < rep["meta_bytes"] < rep["header_bytes"] < 1100  # safetensors header + compressed metadata
    assert rep["size_vs_prediction"] < 1.01
    assert rep["float32_bytes"] == float32_model_bytes(s)
    assert rep["compression"] > 15
    blobs, _ = load_container(tmp_path / "m.kdbnn")
    assert sorted(blobs) == ["bits", "f32"]  # a handful of flat blobs, not one tensor per weight
    assert sum(b.numel() * b.element_size() for b in blobs.values()) == packed_model_bytes(s)


def test_demo_student_file_within_one_percent_of_prediction(tmp_path):
    """Issue 6 "Done when": the demo student's .kdbnn equals the summary's prediction within 1%."""
    from kd_bnn.config import load_config
    from kd_bnn.engine.build import build_model, build_student

    cfg = load_config(REPO / "configs" / "demo.yaml")
    teacher = build_model(cfg.teacher, cfg.data.classes, tuple(cfg.data.input_size), load_weights=False)
    student, _ = build_student(teacher, cfg)
    student.eval()
    rep = export(student, tmp_path / "demo.kdbnn", tuple(cfg.data.input_size))
    predicted = packed_model_bytes(student)
    assert rep["tensor_bytes"] == predicted
    size = (tmp_path / "demo.kdbnn").stat().st_size
    assert size == rep["file_bytes"]
    assert abs(size - predicted) <= 0.01 * predicted, (size, predicted)
    assert size - predicted < 1100, f"header + metadata take {size - predicted} bytes"


def test_stored_tensors_and_layer_table(tmp_path):
    s = _student("xnor", pad_value=1.0)
    export(s, tmp_path / "m.kdbnn")
    stored, meta = _stored(tmp_path / "m.kdbnn")
    assert stored.keys() == _stored(tmp_path / "m.kdbnn", s)[0].keys()  # same plan on student and skeleton
    pairs = conv_bn_pairs(s)
    mods = dict(s.named_modules())
    by_path = {e["path"]: e for e in meta["layers"]}
    assert meta["class_names"] == CLASSES and meta["input_size"] == list(SIZE)
    assert meta["skeleton"]["family"] == "darknet" and "[net]" in meta["skeleton"]["options"]["cfg_text"]
    assert len(meta["anchors"]) == 1 and len(meta["anchors"][0]) == 5
    assert meta["binary"]["mode"] == "xnor" and meta["binary"]["pad_value"] == 1.0
    nbin = 0
    for path, m in mods.items():
        if isinstance(m, BinaryConv2d):
            nbin += 1
            e, t = by_path[path], stored[path]
            assert e == {"path": path, "kind": "binary_conv", "bn": pairs[path]}  # options: file defaults
            assert set(t) == {"words", "alpha", "bn_scale", "bn_shift"}
            assert torch.equal(t["words"], pack_signs(m.weight)) and t["words"].dtype == torch.int64
            assert torch.allclose(t["alpha"], m.weight_scale())
            sc, sh = bn_affine(mods[pairs[path]])
            assert torch.allclose(t["bn_scale"], sc.float()) and torch.allclose(t["bn_shift"], sh.float())
        elif isinstance(m, nn.Conv2d):
            assert by_path[path]["kind"] == "float_conv"
            w = stored[path]["weight"]
            assert w.shape == m.weight.shape and w.dtype == torch.float32
    for bn in pairs.values():
        assert bn not in by_path and bn not in stored  # folded: no entry, nothing stored
    assert nbin == meta["binary"]["num_binary_convs"] > 0
    for e in meta["layers"]:  # no geometry, no tensor names: the skeleton tells those
        assert set(e) <= {"path", "kind", "bn", *BINARY_OPTIONS}
    assert read_metadata(tmp_path / "m.kdbnn") == meta


def test_per_layer_binary_options_only_where_they_differ(tmp_path):
    s = _student("xnor")
    convs = [n for n, m in s.named_modules() if isinstance(m, BinaryConv2d)]
    s.get_submodule(convs[1]).pad_value = 1.0
    export(s, tmp_path / "m.kdbnn")
    meta = read_metadata(tmp_path / "m.kdbnn")
    assert meta["binary"]["pad_value"] == -1.0  # the majority
    by_path = {e["path"]: e for e in meta["layers"]}
    assert by_path[convs[1]]["pad_value"] == 1.0
    assert all("pad_value" not in by_path[c] for c in convs if c != convs[1])


def test_skeleton_that_does_not_fit_is_refused_at_export(tmp_path):
    """The exporter rebuilds the skeleton and requires the loader's layout to equal its own."""
    with pytest.raises(ExportError, match="would not load.*does not exist"):
        export(_student("bwn"), tmp_path / "x.kdbnn",
               extra_meta={"skeleton": {"family": "bireal", "options": {"preset": "small"}}})
    assert not (tmp_path / "x.kdbnn").exists()


def test_bn_folding_formula():
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 4, 3, 3)
    s, t = bn_affine(bn)
    assert torch.allclose(bn(x), x * s.float().view(1, -1, 1, 1) + t.float().view(1, -1, 1, 1), atol=1e-5)


@pytest.mark.parametrize("mode", ["bwn", "xnor"])
def test_float_equivalent_matches_student(mode):
    s = _student(mode)
    feq = float_equivalent(s)
    assert not any(isinstance(m, BinaryConv2d) for m in feq.modules())
    x = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        a, b = s(x), feq(x)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-4 * p.abs().max().item())


@pytest.mark.parametrize("mode", ["bwn", "xnor"])
def test_onnx_export_runs_like_the_student(tmp_path, mode):
    """--onnx writes the float-equivalent graph; onnxruntime gives the student's raw maps."""
    import importlib.util

    s = _student(mode).eval()
    rep = export_onnx(s, tmp_path / "m.onnx", SIZE)
    if importlib.util.find_spec("onnx") is None:  # optional outside the dev extras: a clear skip
        assert "onnx" in rep["skipped"] and not (tmp_path / "m.onnx").exists()
        pytest.skip("onnx is not installed (it is in the dev extras)")
    assert "skipped" not in rep, rep
    assert (tmp_path / "m.onnx").stat().st_size == rep["bytes"] > 0
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (it is in the dev extras)")
    x = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = s(x)
    assert len(got) == len(ref) == len(rep["outputs"])
    for g, r in zip(got, ref):
        assert torch.allclose(torch.from_numpy(g), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())


def test_unknown_skeleton_is_refused(tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.input_size = (8, 8)

    with pytest.raises(ExportError, match="skeleton"):
        export(Tiny(), tmp_path / "x.kdbnn")


def test_export_checkpoint_random_and_trained(tmp_path):
    from kd_bnn.config import load_config
    from kd_bnn.engine.build import load_student
    from kd_bnn.engine.checkpoint import save_checkpoint

    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.input_size=[96,320]"])
    rep = export_checkpoint(cfg, None, tmp_path / "rand.kdbnn")
    assert rep["checkpoint"] is None and rep["tensor_bytes"] == rep["predicted_packed_bytes"]
    # a "trained" checkpoint: random weights saved the way the trainer saves them
    from kd_bnn.engine.build import build_model, build_student

    student, _ = build_student(random_weights_(build_model(cfg.teacher, cfg.data.classes, (96, 320), False), 3), cfg)
    save_checkpoint(tmp_path / "best.pt", {"model": student.state_dict()})
    rep2 = export_checkpoint(cfg, tmp_path / "best.pt", tmp_path / "t.kdbnn")
    assert rep2["checkpoint"] == str(tmp_path / "best.pt")
    stored, _ = _stored(tmp_path / "t.kdbnn")
    ref = load_student(cfg, tmp_path / "best.pt")
    w = ref.get_submodule("layers.2.conv").weight
    assert torch.equal(stored["layers.2.conv"]["words"], pack_signs(w))
    with pytest.raises(FileNotFoundError):
        export_checkpoint(cfg, tmp_path / "missing.pt", tmp_path / "x.kdbnn")


def test_export_cli(tmp_path, capsys):
    out, js = tmp_path / "m.kdbnn", tmp_path / "r.json"
    tool = load_tool("export")
    assert tool.main(["--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out), "--json", str(js),
                      "data.input_size=[96,320]"]) == 0
    assert "compression" in capsys.readouterr().out and out.is_file()
    rep = json.loads(js.read_text())
    assert rep["file_bytes"] == out.stat().st_size and rep["tensor_bytes"] == rep["predicted_packed_bytes"]
    assert 0.5 < rep["binary_mac_fraction"] < 1.0  # the demo BWN copy: all but the first and prediction convs
    assert tool.main(["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint", str(tmp_path / "nope.pt"),
                      "--out", str(tmp_path / "n.kdbnn")]) == 2
    assert "nope.pt" in capsys.readouterr().err
