"""Binary block options (real-valued shortcut, RSign, RPReLU), two-stage training's float-weight stage,
and their export: the runtime rebuilds the blocks from plain metadata and equals the student."""

from __future__ import annotations

import pytest
import torch
from blocked import randomise_blocks
from torch import nn

from kd_bnn.binary import binarize
from kd_bnn.binary.blocks import BinaryBlock, ChannelShortcut, RPReLU, block_specs_of
from kd_bnn.binary.layers import BinaryConv2d, set_float_weights
from kd_bnn.config import ConfigError, load_config
from kd_bnn.models.darknet.model import load_darknet

CFG = "configs/darknet/yolov2-demo.cfg"
NAMES = ["Car", "Pedestrian", "Cyclist"]
ALL = {"shortcut": True, "rsign": True, "rprelu": True}


def demo_model() -> nn.Module:
    torch.manual_seed(0)
    return load_darknet(CFG, class_names=NAMES, input_size=(64, 192))


@pytest.mark.parametrize("c_in,c_out,kind", [(8, 8, "identity"), (4, 10, "repeat"), (10, 4, "fold"), (9, 3, "fold")])
def test_channel_shortcut_values(c_in, c_out, kind):
    x = torch.randn(2, c_in, 5, 7)
    sc = ChannelShortcut(c_in, c_out)
    assert sc.kind == kind
    y = sc(x)
    assert y.shape == (2, c_out, 5, 7)
    for c in range(c_out):
        if kind == "fold":
            want = x[:, [j for j in range(c_in) if j % c_out == c]].mean(1)
        else:
            want = x[:, c % c_in]
        torch.testing.assert_close(y[:, c], want)


def test_strided_shortcut_pools_to_the_conv_output_size():
    conv = nn.Conv2d(4, 8, 3, 2, 1)
    for h, w in ((9, 13), (8, 12)):
        x = torch.randn(1, 4, h, w)
        sc = ChannelShortcut(4, 8, stride=2)
        assert sc(x).shape == conv(x).shape
        torch.testing.assert_close(sc(x)[:, 4:], torch.nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True))


def test_binarize_applies_blocks_and_reports_each_conv():
    model, report = binarize(demo_model(), {"mode": "xnor", "keep_pointwise": True, "block": ALL})
    rows = {r.path: r for r in report.rows}
    assert rows["layers.2.conv"].block == "shortcut repeat+rsign+rprelu"
    assert rows["layers.15.conv"].block == "shortcut fold+rsign+rprelu"  # 288 -> 128 channels
    assert rows["layers.9.conv"].block == "-"  # kept float (keep_pointwise): no block
    assert "block" in report.table().splitlines()[0]
    blk = model.get_submodule("layers.2.conv")
    assert isinstance(blk, BinaryBlock) and isinstance(blk.conv, BinaryConv2d)
    assert isinstance(model.get_submodule("layers.2.bn"), nn.Identity)  # the BN moved into the block
    assert isinstance(model.get_submodule("layers.2.act"), RPReLU)
    raw = model(torch.rand(2, 3, 64, 192))
    raw[0].sum().backward()
    assert blk.move.bias.grad is not None and model.get_submodule("layers.2.act").gamma.grad is not None


def test_rprelu_starts_as_the_activation_it_replaces():
    x = torch.rand(2, 3, 64, 192)
    plain, _ = binarize(demo_model(), {"mode": "xnor"})
    blocked, _ = binarize(demo_model(), {"mode": "xnor", "block": {"rprelu": True}})
    plain.eval(), blocked.eval()
    torch.testing.assert_close(blocked(x)[0], plain(x)[0])


def test_options_that_cannot_apply_are_named():
    _, report = binarize(demo_model(), {"mode": "bwn", "block": ALL})
    row = next(r for r in report.rows if r.path == "layers.2.conv")
    assert "not applied: rsign: a bwn conv has no activation sign" in row.block
    assert row.block.startswith("shortcut repeat+rprelu")
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    _, report = binarize(seq, {"mode": "xnor", "keep_last": False, "block": ALL})
    row = next(r for r in report.rows if r.path == "1")
    assert row.block == "not applied: block options: the family names no conv -> bn -> act block for this conv"


def test_float_weights_stage_uses_latent_weights_with_binary_inputs():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    b = BinaryConv2d.from_conv(conv, mode="xnor")
    set_float_weights(b, True)
    x = torch.randn(1, 4, 5, 5)
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.where(x >= 0, 1.0, -1.0), (1, 1, 1, 1), value=-1.0),
                                      conv.weight)
    torch.testing.assert_close(b(x), want)
    set_float_weights(b, False)
    assert not torch.allclose(b(x), want)


def test_stage1_train_needs_an_xnor_student():
    with pytest.raises(ConfigError, match="stage1_train.*'xnor'"):
        load_config("configs/demo.yaml", ["stage1_train={epochs: 1}"])
    cfg = load_config("configs/demo.yaml", ["stage1_train={epochs: 1}", "student.binary.mode=xnor"])
    assert cfg.stage1_train.epochs == 1


@pytest.mark.parametrize("mode", ["xnor", "bwn"])
def test_export_runtime_equals_the_blocked_student(tmp_path, mode):
    from kd_bnn.deploy.export import export
    from kd_bnn.deploy.runtime import FusedBinaryBlock, Runtime

    model, _ = binarize(demo_model(), {"mode": mode, "keep_pointwise": True, "block": ALL})
    randomise_blocks(model)
    model.eval()
    rep = export(model, tmp_path / "m.kdbnn")
    assert rep["binary_mac_fraction"] > 0.8
    assert Runtime(tmp_path / "m.kdbnn", fuse=False).meta["blocks"] == block_specs_of(model)
    x = torch.rand(2, 3, 64, 192)
    want = model(x)[0]
    for fuse, backend in ((False, None), (True, None), (True, "torch")):
        rt = Runtime(tmp_path / "m.kdbnn", fuse=fuse, backend=backend)
        block = rt.model.get_submodule("layers.4.conv")
        assert isinstance(block, FusedBinaryBlock if fuse else BinaryBlock)
        got = rt(x)[0]
        assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item()), (fuse, backend)


@pytest.mark.parametrize("kind,c_y,c_s", [("identity", 8, 8), ("repeat", 10, 4), ("fold", 4, 10), ("fold", 3, 9),
                                          ("none", 5, 0)])
def test_block_epilogue_kernel_equals_torch(kind, c_y, c_s):
    from kd_bnn.deploy.kernels import block_epilogue, extension_available

    if not extension_available():
        pytest.skip("the C++ kernels are not built on this machine (no compiler/ninja)")
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, c_y, 5, 7, generator=g)
    s = torch.randn(2, c_s, 5, 7, generator=g) if c_s else None
    gamma, slope, zeta = torch.randn(c_y, generator=g), torch.rand(c_y, generator=g), torch.randn(c_y, generator=g)
    want = block_epilogue(y.clone(), s, kind, gamma, slope, zeta, backend="torch")
    got = block_epilogue(y.clone(), s, kind, gamma, slope, zeta, backend="ext")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the torch path is the formula itself
    sc = ChannelShortcut(c_s, c_y)(s) if c_s else 0.0
    v = y + sc - gamma.view(1, -1, 1, 1)
    torch.testing.assert_close(want, torch.nn.functional.prelu(v, slope) + zeta.view(1, -1, 1, 1))


@pytest.mark.parametrize("blocks,match", [
    ({"layers.2.conv": {"shortcut": "repeat", "trust": True}}, "unknown keys \\['trust'\\]"),
    ({"layers.2.conv": {"shortcut": "fold"}}, "does not fit the conv"),
    ({"layers.1": {"rsign": True}}, "not a conv of a conv -> bn -> act block"),
    ({"layers.2.conv": {"rsign": "yes"}}, "expected true/false"),
    (["layers.2.conv"], "expected a mapping"),
])
def test_hostile_block_metadata_is_refused(tmp_path, blocks, match):
    from kd_bnn.deploy.export import export
    from kd_bnn.deploy.format import FormatError, load_container, save_container
    from kd_bnn.deploy.runtime import Runtime

    model, _ = binarize(demo_model(), {"mode": "xnor", "block": ALL})
    export(model.eval(), tmp_path / "m.kdbnn")
    tensors, meta = load_container(tmp_path / "m.kdbnn")
    meta["blocks"] = blocks
    save_container(tmp_path / "bad.kdbnn", tensors, meta)
    with pytest.raises(FormatError, match=match):
        Runtime(tmp_path / "bad.kdbnn")


def test_staged_binarization_reaches_convs_inside_blocks():
    """Stages name convs by their path before the rewrite; the report keeps the stage and
    apply_stages switches the BinaryConv2d inside each BinaryBlock."""
    from kd_bnn.binary.convert import apply_stages

    policy = {"mode": "xnor", "block": ALL, "stages": [{"layers": ["layers.15.conv"], "epoch": 3}]}
    model, report = binarize(demo_model(), policy)
    row = next(r for r in report.rows if r.path == "layers.15.conv")
    assert (row.stage, row.epoch) == ("stage0", 3)
    inner = model.get_submodule("layers.15.conv.conv")
    assert isinstance(inner, BinaryConv2d) and not inner.enabled
    apply_stages(model, policy, 3)
    assert inner.enabled


def test_block_without_rprelu_fuses_its_plain_activation(tmp_path):
    """A block whose activation stays LeakyReLU (shortcut only) runs fused with slope 0.1."""
    from kd_bnn.deploy.export import export
    from kd_bnn.deploy.runtime import FusedBinaryBlock, Runtime

    model, _ = binarize(demo_model(), {"mode": "xnor", "block": {"shortcut": True}})
    randomise_blocks(model).eval()
    export(model, tmp_path / "m.kdbnn")
    rt = Runtime(tmp_path / "m.kdbnn")
    block = rt.model.get_submodule("layers.4.conv")
    assert isinstance(block, FusedBinaryBlock)
    assert torch.allclose(block.slope, torch.full_like(block.slope, 0.1))
    x = torch.rand(2, 3, 64, 192)
    want, got = model(x)[0], rt(x)[0]
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
