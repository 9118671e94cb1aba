"""`Runtime`: a .kdbnn student on the packed kernels equals the PyTorch student; bad files refused."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toolload import load_tool
from torch import nn

from kd_bnn.binary import binarize
from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.deploy import format as fmt
from kd_bnn.deploy.export import export
from kd_bnn.deploy.format import FormatError, load_container, save_container
from kd_bnn.deploy.kernels import xnor_conv2d
from kd_bnn.deploy.pack import unpack_signs
from kd_bnn.deploy.runtime import PackedBinaryConv, Runtime
from kd_bnn.models.darknet.model import darknet, random_weights_

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Car", "Pedestrian", "Cyclist"]
SIZE = (96, 320)


def _rand_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def _darknet_student(mode: str, **opts) -> nn.Module:
    teacher = random_weights_(darknet("yolov2-demo", class_names=CLASSES, input_size=SIZE), 1)
    return binarize(teacher, {"mode": mode, **opts})[0].eval()


def _family_student(family: str, opts: dict, policy: dict | None):
    import kd_bnn.models  # noqa: F401
    from kd_bnn.models.detector import build_detector

    torch.manual_seed(0)
    m = build_detector(family, class_names=CLASSES, input_size=SIZE, **opts)
    if policy is not None:
        m, _ = binarize(m, policy)
    _rand_bn(m)
    return m.eval(), {"skeleton": {"family": family, "options": opts}}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = {
    "darknet-bwn": lambda: (_darknet_student("bwn"), None),
    "darknet-xnor-pad-1": lambda: (_darknet_student("xnor", pad_value=-1.0), None),
    "darknet-xnor-pad+1-learned": lambda: (_darknet_student("xnor", pad_value=1.0, weight_scaling="learned"), None),
    "darknet-xnor-k-none": lambda: (_darknet_student("xnor", input_scaling="xnor_k", weight_scaling="none"), None),
    "binary_densenet-small": lambda: _family_student("binary_densenet", {"preset": "small"}, None),
    "bireal-small": lambda: _family_student("bireal", {"preset": "small"}, None),
    "mobilenet_yolo-bwn": lambda: _family_student(
        "mobilenet_yolo", {"width_mult": 0.35, "head_channels": 64, "passthrough_channels": 16}, {"mode": "bwn"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_equals_student(tmp_path, case):
    student, extra = CASES[case]()
    export(student, tmp_path / "m.kdbnn", extra_meta=extra)
    rt = Runtime(tmp_path / "m.kdbnn")
    n_bin = sum(isinstance(m, BinaryConv2d) for m in student.modules())
    packed = [m for m in rt.model.modules() if isinstance(m, PackedBinaryConv)]
    assert len(packed) == n_bin > 0
    assert not any(isinstance(m, BinaryConv2d) for m in rt.model.modules())
    x = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = student(x)
    out = rt(x)
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        assert _rel_err(a, b) < 1e-4, case
    da = rt.predict(x, conf_thres=0.3)
    db = student.predict(ref, conf_thres=0.3)
    for p, q in zip(da, db):
        assert len(p) == len(q)
        assert torch.equal(p.labels, q.labels)
        assert torch.allclose(p.boxes, q.boxes, atol=1e-2) and torch.allclose(p.scores, q.scores, atol=1e-4)


def test_runtime_holds_only_packed_weights(tmp_path):
    student = _darknet_student("bwn")
    export(student, tmp_path / "m.kdbnn")
    rt = Runtime(tmp_path / "m.kdbnn")
    assert rt.fused > 0  # Darknet conv -> bn -> leaky fused into the kernel call
    for m in rt.model.modules():
        if isinstance(m, PackedBinaryConv):
            assert m.words.dtype == torch.int64 and not list(m.parameters())
    f32 = sum(p.numel() * 4 for p in student.parameters())
    assert rt.resident_weight_bytes() < f32 / 5


def test_xnor_layers_bit_exact_before_transform(tmp_path):
    """The kernel's integer dot products of every XNOR layer equal conv(pad(sign x), sign W)."""
    student = _darknet_student("xnor", pad_value=1.0)
    export(student, tmp_path / "m.kdbnn")
    rt = Runtime(tmp_path / "m.kdbnn")
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0]))
             for n, m in student.named_modules() if isinstance(m, BinaryConv2d)]
    with torch.no_grad():
        student(torch.rand(1, 3, *SIZE))
    for h in hooks:
        h.remove()
    mods = dict(rt.model.named_modules())
    assert inputs
    for name, x in inputs.items():
        pk = mods[name]
        assert isinstance(pk, PackedBinaryConv) and pk.mode == "xnor"
        kh, kw = pk.kernel_size
        dot = xnor_conv2d(x, pk.words, pk.in_channels, (kh, kw), pk.stride[0], pk.pad[0], pk.pad_value, output="int")
        xs = F.pad(torch.where(x >= 0, 1.0, -1.0), pk.pad, value=pk.pad_value)
        ref = F.conv2d(xs.double(), unpack_signs(pk.words, pk.in_channels, kh, kw).double(), stride=pk.stride)
        assert torch.equal(dot.double(), ref), name


def test_torch_backend_equals_kernels(tmp_path):
    student = _darknet_student("xnor")
    export(student, tmp_path / "m.kdbnn")
    x = torch.rand(1, 3, *SIZE)
    a = Runtime(tmp_path / "m.kdbnn")(x)
    b = Runtime(tmp_path / "m.kdbnn", backend="torch", fuse=False)(x)
    for p, q in zip(a, b):
        assert _rel_err(p, q) < 1e-5


# ----------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kdbnn") / "good.kdbnn"
    export(_darknet_student("bwn"), path)
    return path


def _header(blob: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8:8 + n])


def test_truncated_file_refused(good_file, tmp_path):
    blob = good_file.read_bytes()
    for cut in (4, 100, len(blob) - 10):
        p = tmp_path / f"cut{cut}.kdbnn"
        p.write_bytes(blob[:cut])
        with pytest.raises(FormatError, match="truncated"):
            Runtime(p)


def test_flipped_weight_bit_refused(good_file, tmp_path):
    blob = bytearray(good_file.read_bytes())
    n, _ = _header(bytes(blob))
    blob[8 + n + 17] ^= 0x10
    p = tmp_path / "flip.kdbnn"
    p.write_bytes(bytes(blob))
    with pytest.raises(FormatError, match="checksum"):
        Runtime(p)


def _resave_stale_checksum(src: Path, dst: Path, blobs: dict, meta: dict) -> None:
    """Write ``blobs`` + ``meta`` keeping the checksum of ``src``: an edit made without the writer."""
    from safetensors.torch import save

    _, header = _header(src.read_bytes())
    tensors = dict(blobs, meta=fmt.encode_meta(meta))
    dst.write_bytes(save(tensors, metadata=header["__metadata__"]))


def test_tampered_metadata_refused(good_file, tmp_path):
    blobs, meta = load_container(good_file)
    for e in meta["layers"]:
        if e["kind"] == "binary_conv":
            e["pad_value"] = 1.0  # an edited layer table, weights untouched
    p = tmp_path / "meta.kdbnn"
    _resave_stale_checksum(good_file, p, blobs, meta)
    with pytest.raises(FormatError, match="checksum mismatch"):
        Runtime(p)
    assert fmt.read_metadata(p)["layers"] == meta["layers"]  # readable, but Runtime verifies


def test_version_1_file_refused(good_file, tmp_path):
    from safetensors.torch import save

    blobs, meta = load_container(good_file)
    md = {"format": "kdbnn", "format_version": "1", "meta": json.dumps(meta),
          "checksum": fmt.tensors_checksum(blobs)}
    p = tmp_path / "old.kdbnn"
    p.write_bytes(save(blobs, metadata=md))
    with pytest.raises(FormatError, match="older .kdbnn format.*re-export it from the checkpoint with tools/export.py"):
        Runtime(p)


@pytest.mark.parametrize("blob,delta", [("f32", -1), ("f32", +3), ("bits", -2)])
def test_blob_with_wrong_length_refused(good_file, tmp_path, blob, delta):
    blobs, meta = load_container(good_file)
    n = blobs[blob].numel()
    b = blobs[blob]
    blobs[blob] = b[:n + delta].clone() if delta < 0 else torch.cat([b, torch.zeros(delta, dtype=b.dtype)])
    p = tmp_path / "len.kdbnn"
    save_container(p, blobs, meta)  # a consistent checksum: the layout check must catch it
    with pytest.raises(FormatError, match=rf"len.kdbnn: blob '{blob}' holds {n + delta} elements, the layout "
                                          rf"of the rebuilt model needs {n}"):
        Runtime(p)


def test_blob_missing_or_unexpected_refused(good_file, tmp_path):
    blobs, meta = load_container(good_file)
    p = tmp_path / "b.kdbnn"
    save_container(p, {k: v for k, v in blobs.items() if k != "bits"}, meta)
    with pytest.raises(FormatError, match="blob 'bits' is missing"):
        Runtime(p)
    save_container(p, dict(blobs, extra=torch.zeros(3)), meta)
    with pytest.raises(FormatError, match="unexpected tensor 'extra'"):
        Runtime(p)
    save_container(p, dict(blobs, f32=blobs["f32"].double()), meta)
    with pytest.raises(FormatError, match="blob 'f32' must be 1-D torch.float32"):
        Runtime(p)


def test_layer_table_that_does_not_fit_the_skeleton_refused(good_file, tmp_path):
    blobs, meta = load_container(good_file)
    conv = next(e for e in meta["layers"] if e["kind"] == "binary_conv")
    cases = [
        (lambda m: m["layers"].append({"path": "layers.99.conv", "kind": "other"}),
         "layer 'layers.99.conv' of the layer table does not exist in the rebuilt DarknetDetector"),
        (lambda m: next(e for e in m["layers"] if e["path"] == conv["path"]).update(bn="layers.0.bn"),
         f"layer '{conv['path']}': the table folds BatchNorm 'layers.0.bn' into it, the rebuilt model pairs "
         f"it with '{conv['bn']}'"),
        (lambda m: next(e for e in m["layers"] if e["path"] == conv["path"]).update(kind="magic"),
         f"layer '{conv['path']}': unknown kind 'magic'"),
        (lambda m: next(e for e in m["layers"] if e["path"] == conv["path"]).update(path=conv["bn"], bn=None),
         f"layer '{conv['bn']}' is a binary_conv in the table but a BatchNorm2d"),
        (lambda m: next(e for e in m["layers"] if e["path"] == conv["path"]).update(mode="ternary"),
         f"binary layer '{conv['path']}': mode 'ternary' is not 'bwn' or 'xnor'"),
    ]
    import copy
    import re

    for edit, message in cases:
        m = copy.deepcopy(meta)
        edit(m)
        p = tmp_path / "t.kdbnn"
        save_container(p, blobs, m)
        with pytest.raises(FormatError, match=re.escape(message)):
            Runtime(p)


def test_per_layer_binary_option_reaches_the_runtime(tmp_path):
    student = _darknet_student("xnor")
    convs = [n for n, m in student.named_modules() if isinstance(m, BinaryConv2d)]
    student.get_submodule(convs[2]).pad_value = 1.0  # one layer differs from the file default
    export(student, tmp_path / "m.kdbnn")
    rt = Runtime(tmp_path / "m.kdbnn")
    mods = dict(rt.model.named_modules())
    assert [mods[c].pad_value for c in convs] == [1.0 if c == convs[2] else -1.0 for c in convs]
    x = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = student(x)
    for a, b in zip(rt(x), ref):
        assert _rel_err(a, b) < 1e-4


def test_newer_version_refused(good_file, tmp_path):
    from safetensors.torch import load, save

    blob = good_file.read_bytes()
    _, header = _header(blob)
    md = dict(header["__metadata__"], format_version="99")
    p = tmp_path / "new.kdbnn"
    p.write_bytes(save(load(blob), metadata=md))
    with pytest.raises(FormatError, match="newer"):
        Runtime(p)


def test_container_without_model_refused(tmp_path):
    p = tmp_path / "other.kdbnn"
    save_container(p, {"x": torch.zeros(2)}, {"kind": "something-else"})
    with pytest.raises(FormatError, match="not an exported model"):
        Runtime(p)
    with pytest.raises(FileNotFoundError):
        Runtime(tmp_path / "missing.kdbnn")


# ----------------------------------------------------------------------------- CLIs


def test_infer_cli_writes_results_and_images(good_file, tmp_path, capsys):
    import cv2

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(150, 500), (120, 300)]):
        cv2.imwrite(str(imgs / f"{i:06d}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    out = tmp_path / "out"
    infer = load_tool("infer")
    assert infer.main(["--model", str(good_file), "--images", str(imgs), "--out", str(out), "--conf", "0.05"]) == 0
    for i, (h, w) in enumerate([(150, 500), (120, 300)]):
        lines = (out / "data" / f"{i:06d}.txt").read_text().splitlines()
        for line in lines:
            f = line.split()
            assert len(f) == 16 and f[0] in CLASSES
            x1, y1, x2, y2 = map(float, f[4:8])
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        assert cv2.imread(str(out / "images" / f"{i:06d}.png")).shape[:2] == (h, w)
    assert infer.main(["--model", str(good_file), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "none" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_model_cli(good_file, tmp_path):
    js = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "model", "--model", str(good_file),
                        "--repeat", "2", "--json", str(js)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(js.read_text())
    assert res["teacher"]["min_ms"] > 0 and res["runtime"]["min_ms"] > 0
    assert res["file_bytes"] * 10 < res["teacher_fp32_bytes"]
    assert res["teacher"]["isa"].startswith("aten=") and res["runtime"]["isa"]


def test_layer_table_missing_a_tensor_refused(good_file, tmp_path):
    blobs, meta = load_container(good_file)
    victim = next(e for e in meta["layers"] if e["kind"] == "float_conv")
    meta["layers"].remove(victim)  # consistent checksum, but the skeleton's conv is left unset
    p = tmp_path / "incomplete.kdbnn"
    save_container(p, blobs, meta)
    with pytest.raises(FormatError, match=r"incomplete.kdbnn: the layer table leaves \d+ tensor\(s\) .* unset"):
        Runtime(p)


@pytest.mark.parametrize("size,stride,padding,hw", [(2, 2, 1, (7, 9)), (2, 2, 0, (8, 6)), (2, 1, 1, (5, 5)),
                                                    (3, 2, 2, (9, 11))])
def test_packed_maxpool_is_sign_of_maxpool(size, stride, padding, hw):
    from kd_bnn.deploy.pack import pack_activations, unpack_activations
    from kd_bnn.models.darknet.model import darknet_maxpool
    from kd_bnn.models.darknet.packed import packed_maxpool

    x = torch.randn(2, 70, *hw, generator=torch.Generator().manual_seed(size + padding))
    ref = torch.where(darknet_maxpool(x, size, stride, padding) >= 0, 1.0, -1.0)
    out = unpack_activations(packed_maxpool(pack_activations(x), size, stride, padding), 70)
    assert torch.equal(out, ref)


def test_packed_chains_plan_and_equality(tmp_path):
    student = _darknet_student("xnor")
    export(student, tmp_path / "m.kdbnn")
    a = Runtime(tmp_path / "m.kdbnn")
    b = Runtime(tmp_path / "m.kdbnn", packed_chains=False)
    assert a.packed_plan is not None and any(a.packed_plan) and b.packed_plan is None
    layers = list(a.model.layers)
    for i, p in enumerate(a.packed_plan):  # nothing packed flows into a float consumer
        if p and i + 1 < len(layers):
            from kd_bnn.models.darknet.model import MaxPool
            from kd_bnn.models.darknet.packed import xnor_block

            assert xnor_block(layers[i + 1], a.ops) is not None or isinstance(layers[i + 1], MaxPool)
    x = torch.rand(1, 3, *SIZE)
    for p, q in zip(a(x), b(x)):
        assert torch.equal(p, q)
    bwn = _darknet_student("bwn")
    export(bwn, tmp_path / "b.kdbnn")
    plan = Runtime(tmp_path / "b.kdbnn").packed_plan  # float activations: nothing to pack (the
    assert plan is None or not any(p is True for p in plan)  # stem conv + max-pool fusion may apply


def test_skipped_init_restores_torch_init_even_on_error():
    """The loader builds its skeleton without initialising weights (all are overwritten from the
    file); torch.nn.init is back to normal afterwards, also when the build fails."""
    from torch import nn

    from kd_bnn.deploy.schema import skipped_init

    before = nn.init.kaiming_uniform_
    with pytest.raises(RuntimeError), skipped_init():
        assert nn.init.kaiming_uniform_ is not before
        raise RuntimeError("build failed")
    assert nn.init.kaiming_uniform_ is before
    w = torch.full((4, 4), 7.0)
    nn.init.zeros_(w)
    assert w.abs().sum() == 0
