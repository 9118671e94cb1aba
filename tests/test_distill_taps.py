"""FeatureTaps and adapters."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from test_distill_fakes import TinyDetector
from torch import nn

from kd_bnn.distill import (
    Adapter,
    FeatureTaps,
    TapError,
    build_adapter,
    remove_tap_hooks,
    resolve_tap,
)


def test_taps_collect_by_name_and_path():
    torch.manual_seed(0)
    m = TinyDetector().eval()
    x = torch.rand(2, 3, 32, 32)
    with FeatureTaps(m, {"a": "s4", "b": "backbone.0.0"}) as taps:
        m(x)
        assert taps["a"].shape == (2, 16, 8, 8)
        assert torch.equal(taps["a"], m.backbone(x))
        assert torch.equal(taps["b"], m.backbone[0][0](x))
        m(x[:1])  # features are per forward
        assert taps["a"].shape[0] == 1
    # removed on exit: no hook left behind
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())
    assert len(m._forward_pre_hooks) == 0


def test_bad_path_lists_close_matches():
    m = TinyDetector()
    with pytest.raises(TapError) as exc:
        FeatureTaps(m, {"x": "backbone.1.O"})
    assert "backbone.1.0" in str(exc.value)
    assert resolve_tap(m, "s2") == "backbone.0"


def test_deepcopy_and_save_with_taps_attached():
    torch.manual_seed(0)
    m = TinyDetector().eval()
    taps = FeatureTaps(m, ["s4"])
    x = torch.rand(1, 3, 32, 32)
    m(x)
    before = taps["s4"].clone()
    dup = copy.deepcopy(m)
    dup.backbone[1][0].weight.data.mul_(2.0)
    dup(torch.rand(1, 3, 32, 32))
    assert torch.equal(taps["s4"], before), "the deep copy wrote into the original's taps"
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == set(m.state_dict())
    pickle.dumps(m)  # no local closures on the model
    assert remove_tap_hooks(dup) == 2  # the copy's hook + pre-hook
    assert all(len(mod._forward_hooks) == 0 for mod in dup.modules())
    m(x)
    assert torch.equal(taps["s4"], before)
    taps.remove()


def test_adapters_shapes():
    assert isinstance(build_adapter((16, 8, 8), (16, 8, 8)), nn.Identity)
    a = build_adapter((8, 8, 8), (16, 8, 8))
    assert isinstance(a, Adapter) and a(torch.rand(2, 8, 8, 8)).shape == (2, 16, 8, 8)
    a = build_adapter((2, 8, 16, 16), (2, 16, 8, 8))  # stride differs by 2: avg-pool
    y = a.resize(torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 1, 4, 4))
    assert y.shape == (1, 1, 8, 8)
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(build_adapter((3, 16, 16), (3, 8, 8))(x), nn.functional.avg_pool2d(x, 2))
    up = build_adapter((3, 4, 4), (3, 8, 8))
    assert up(torch.rand(1, 3, 4, 4)).shape == (1, 3, 8, 8)
    # attention-style: only resize, channels left alone
    assert isinstance(build_adapter((3, 8, 8), (5, 8, 8), match_channels=False), nn.Identity)
    with pytest.raises(ValueError):
        build_adapter((3, 8), (3, 8, 8))
