"""`.kdbnn` export: exact packed-size accounting, stored tensors, float-equivalent graph, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_bnn.binary import binarize
from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.binary.summary import conv_bn_pairs, float32_model_bytes, packed_model_bytes
from kd_bnn.deploy.export import (
    ExportError,
    bn_affine,
    export,
    export_checkpoint,
    export_onnx,
    float_equivalent,
)
from kd_bnn.deploy.format import load_container
from kd_bnn.deploy.pack import pack_signs
from kd_bnn.models.darknet.model import darknet, random_weights_

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Car", "Pedestrian", "Cyclist"]
SIZE = (96, 320)


def _tool(name: str):
    """Load tools/<name>.py as a module (its main() runs in-process: no interpreter start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _student(mode: str = "bwn", **opts) -> nn.Module:
    teacher = random_weights_(darknet("yolov2-demo", class_names=CLASSES, input_size=SIZE), 0)
    student, _ = binarize(teacher, {"mode": mode, **opts})
    return student.eval()


@pytest.mark.parametrize("mode,opts", [("bwn", {}), ("xnor", {"pad_value": 1.0, "weight_scaling": "learned"})])
def test_tensor_bytes_equal_summary_prediction(tmp_path, mode, opts):
    s = _student(mode, **opts)
    rep = export(s, tmp_path / "m.kdbnn")
    assert rep["tensor_bytes"] == packed_model_bytes(s) == rep["predicted_packed_bytes"]
    assert rep["file_bytes"] == (tmp_path / "m.kdbnn").stat().st_size
    assert rep["file_bytes"] == rep["tensor_bytes"] + rep["header_bytes"]
    assert 0 < rep["header_bytes"] < 16 * 1024  # safetensors header + JSON metadata only
    assert rep["float32_bytes"] == float32_model_bytes(s)
    assert rep["compression"] > 15


def test_stored_tensors_and_layer_table(tmp_path):
    s = _student("xnor", pad_value=1.0)
    export(s, tmp_path / "m.kdbnn")
    tensors, meta = load_container(tmp_path / "m.kdbnn")
    pairs = conv_bn_pairs(s)
    mods = dict(s.named_modules())
    by_path = {e["path"]: e for e in meta["layers"]}
    assert meta["class_names"] == CLASSES and meta["input_size"] == list(SIZE)
    assert meta["skeleton"]["family"] == "darknet" and "[net]" in meta["skeleton"]["cfg_text"]
    assert len(meta["anchors"]) == 1 and len(meta["anchors"][0]) == 5
    nbin = 0
    for path, m in mods.items():
        if isinstance(m, BinaryConv2d):
            nbin += 1
            e = by_path[path]
            assert e["kind"] == "binary_conv" and e["mode"] == "xnor" and e["pad_value"] == 1.0
            assert torch.equal(tensors[e["tensors"]["words"]], pack_signs(m.weight))
            assert torch.allclose(tensors[e["tensors"]["alpha"]], m.weight_scale())
            assert e["bn"] == pairs[path]
            sc, sh = bn_affine(mods[pairs[path]])
            assert torch.allclose(tensors[e["tensors"]["bn_scale"]], sc.float())
            assert torch.allclose(tensors[e["tensors"]["bn_shift"]], sh.float())
            assert tensors[e["tensors"]["words"]].dtype == torch.int64
        elif isinstance(m, nn.Conv2d):
            assert by_path[path]["kind"] == "float_conv"
    for conv, bn in pairs.items():
        assert by_path[bn]["kind"] == "bn" and by_path[bn]["folded_into"] == conv and not by_path[bn]["tensors"]
    assert nbin == meta["binary"]["num_binary_convs"] > 0
    assert all(t.dtype in (torch.int64, torch.float32) for t in tensors.values())


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


def test_onnx_export_or_clear_skip(tmp_path):
    rep = export_onnx(_student("xnor"), tmp_path / "m.onnx", SIZE)
    if "skipped" in rep:
        assert "onnx" in rep["skipped"]
        assert not (tmp_path / "m.onnx").exists()
    else:
        assert (tmp_path / "m.onnx").stat().st_size == rep["bytes"] > 0


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
    from kd_bnn.engine.checkpoint import save_checkpoint
    from kd_bnn.engine.experiment import load_student

    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.input_size=[96,320]"])
    rep = export_checkpoint(cfg, None, tmp_path / "rand.kdbnn")
    assert rep["checkpoint"] is None and rep["tensor_bytes"] == rep["predicted_packed_bytes"]
    # a "trained" checkpoint: random weights saved the way the trainer saves them
    from kd_bnn.engine.experiment import build_model, build_student

    student, _ = build_student(random_weights_(build_model(cfg.teacher, cfg.data.classes, (96, 320), False), 3), cfg)
    save_checkpoint(tmp_path / "best.pt", {"model": student.state_dict()})
    rep2 = export_checkpoint(cfg, tmp_path / "best.pt", tmp_path / "t.kdbnn")
    assert rep2["checkpoint"] == str(tmp_path / "best.pt")
    tensors, _ = load_container(tmp_path / "t.kdbnn")
    ref = load_student(cfg, tmp_path / "best.pt")
    w = ref.get_submodule("layers.2.conv").weight
    assert torch.equal(tensors["layers.2.conv.words"], pack_signs(w))
    with pytest.raises(FileNotFoundError):
        export_checkpoint(cfg, tmp_path / "missing.pt", tmp_path / "x.kdbnn")


def test_export_cli(tmp_path, capsys):
    out, js = tmp_path / "m.kdbnn", tmp_path / "r.json"
    tool = _tool("export")
    assert tool.main(["--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out), "--json", str(js),
                      "data.input_size=[96,320]"]) == 0
    assert "compression" in capsys.readouterr().out and out.is_file()
    rep = json.loads(js.read_text())
    assert rep["file_bytes"] == out.stat().st_size and rep["tensor_bytes"] == rep["predicted_packed_bytes"]
    assert tool.main(["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint", str(tmp_path / "nope.pt"),
                      "--out", str(tmp_path / "n.kdbnn")]) == 2
    assert "nope.pt" in capsys.readouterr().err
