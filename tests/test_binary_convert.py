"""binarize(): policy rules, report, staged binarization, real model families."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from kd_bnn.binary import (
    BinaryConv2d,
    apply_stages,
    binarize,
    binary_convs,
    packed_model_bytes,
    stage_groups,
    summary,
)
from kd_bnn.config import BinaryConfig, ConfigError


def cbr(ci: int, co: int, k: int = 3, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(co), nn.ReLU())


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.body = nn.Sequential(cbr(8, 16), cbr(16, 16), cbr(16, 16, groups=16))
        self.neck = cbr(16, 16, 1)
        self.pred = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        return self.pred(self.neck(self.body(self.stem(x))))


def reasons(report) -> dict[str, str]:
    return {r.path: r.reason for r in report.rows}


def test_defaults_keep_first_last_depthwise():
    model, rep = binarize(Tiny())
    assert reasons(rep) == {
        "stem.0": "first conv",
        "body.0.0": "converted",
        "body.1.0": "converted",
        "body.2.0": "depthwise",
        "neck.0": "converted",
        "pred": "prediction conv",
    }
    assert set(binary_convs(model)) == {"body.0.0", "body.1.0", "neck.0"}
    assert type(model.stem[0]) is nn.Conv2d and type(model.pred) is nn.Conv2d
    layer = model.body[0][0]
    assert layer.mode == "bwn" and layer.weight_scaling == "mean_abs" and layer.enabled
    text = rep.table()
    assert "first conv" in text and "prediction conv" in text and "3 of 6 convs binary" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["num_binary"] == 3 and d["rows"][1]["shape"] == [16, 8, 3, 3]
    assert 0 < rep.binary_param_fraction() < 1
    model(torch.randn(1, 3, 8, 8)).sum().backward()  # still trains


def test_twice_is_noop_and_policy_from_dict():
    policy = {"mode": "xnor", "pad_value": 1, "input_scaling": "xnor_k", "clip": 1.3}
    model, rep1 = binarize(Tiny(), policy)
    layers = dict(binary_convs(model))
    state = copy.deepcopy(model.state_dict())
    model2, rep2 = binarize(model, policy)
    assert model2 is model
    assert {k: id(v) for k, v in binary_convs(model).items()} == {k: id(v) for k, v in layers.items()}
    assert all(r.reason == "already binary" for r in rep2.rows if r.converted)
    assert rep2.converted == rep1.converted
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    layer = model.body[0][0]
    assert (layer.mode, layer.pad_value, layer.input_scaling, layer.clip) == ("xnor", 1.0, "xnor_k", 1.3)


def test_already_binary_weights_reproduce_float_output_exactly():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                a = torch.rand(m.out_channels) + 0.05
                m.weight.copy_(torch.where(torch.rand_like(m.weight) < 0.5, -1.0, 1.0) * a.view(-1, 1, 1, 1))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 10)
    ref = model(x)
    student, rep = binarize(copy.deepcopy(model), {"keep_first": False, "keep_last": False})
    assert len(rep.converted) == 5  # all but the depthwise
    assert torch.equal(student(x), ref)


def test_include_exclude_globs_regex_and_explicit_naming():
    _, rep = binarize(Tiny(), {"exclude": ["neck*"]})
    assert reasons(rep)["neck.0"] == "excluded by policy"
    _, rep = binarize(Tiny(), {"include": ["re:body\\.[01]"]})
    r = reasons(rep)
    assert r["body.0.0"] == r["body.1.0"] == "converted" and r["neck.0"] == "not included by policy"
    # naming the first / prediction conv exactly overrides keep_first / keep_last
    _, rep = binarize(Tiny(), {"include": ["stem", "pred", "body.0"]})
    r = reasons(rep)
    assert r["stem.0"] == "converted" and r["pred"] == "converted" and r["body.0.0"] == "converted"
    assert r["body.1.0"] == "not included by policy"
    _, rep = binarize(Tiny(), {"keep_first": False, "keep_depthwise": False})
    r = reasons(rep)
    assert r["stem.0"] == "converted" and r["body.2.0"] == "groups unsupported"


@pytest.mark.parametrize("key,value", [("include", ["bdy.*"]), ("exclude", ["nek"]),
                                       ("stages", [{"layers": ["re:bodyy"], "epoch": 2}])])
def test_pattern_matching_nothing_lists_close_matches(key, value):
    with pytest.raises(ConfigError, match="matches no conv layer") as e:
        binarize(Tiny(), {key: value})
    assert "close matches" in str(e.value)


def test_bad_policies():
    with pytest.raises(ConfigError, match="did you mean 'mode'"):
        binarize(Tiny(), {"mdoe": "xnor"})
    with pytest.raises(ConfigError, match="ste_sign"):
        binarize(Tiny(), {"weight_quantizer": "sine"})
    with pytest.raises(ConfigError, match="clip"):
        binarize(Tiny(), {"clip": 0})
    with pytest.raises(ConfigError, match="pad_value"):
        binarize(Tiny(), {"pad_value": 0})
    with pytest.raises(TypeError):
        binarize(Tiny(), ["bwn"])
    model, rep = binarize(Tiny(), BinaryConfig(weight_scaling="none"))
    assert model.body[0][0].weight_scaling == "none"


def test_unsupported_convs_are_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                          nn.ConvTranspose2d(8, 8, 2), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1))
    _, rep = binarize(model)
    assert [r.reason for r in rep.rows] == ["first conv", "groups unsupported", "padding_mode 'reflect' unsupported",
                                            "ConvTranspose2d unsupported", "converted", "prediction conv"]


def test_shared_conv_replaced_everywhere_and_prediction_convs_method():
    shared = nn.Conv2d(4, 4, 3, padding=1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 4, 3, padding=1)
            self.a = shared
            self.b = nn.Sequential(shared)
            self.head1 = nn.Conv2d(4, 2, 1)
            self.head2 = nn.Conv2d(4, 2, 1)
            self.last = nn.Conv2d(4, 4, 1)  # registered last but not a prediction conv

        def prediction_convs(self):
            return ["head1", "head2"]

        def forward(self, x):
            y = self.last(self.b(self.a(self.first(x))))
            return self.head1(y) + self.head2(y)

    model, rep = binarize(M())
    assert isinstance(model.a, BinaryConv2d) and model.b[0] is model.a
    r = reasons(rep)
    assert r["head1"] == r["head2"] == "prediction conv" and r["last"] == "converted"
    assert len(rep.rows) == 5  # the shared conv is listed once
    model(torch.randn(1, 3, 5, 5))

    class Bad(M):
        def prediction_convs(self):
            return ["head3"]

    with pytest.raises(ValueError, match="head3"):
        binarize(Bad())


def test_stages():
    policy = {"stages": [{"layers": ["body"], "epoch": 0}, {"layers": ["neck*", "body.1"], "epoch": 3}]}
    model, rep = binarize(Tiny(), policy)
    groups = {g.name: (g.epoch, g.paths) for g in stage_groups(model, policy)}
    # body.1.0 matches stage0 first (first matching stage wins)
    assert groups == {"stage0": (0, ["body.0.0", "body.1.0"]), "stage1": (3, ["neck.0"])}
    assert {r.path: (r.stage, r.epoch) for r in rep.rows if r.converted} == {
        "body.0.0": ("stage0", 0), "body.1.0": ("stage0", 0), "neck.0": ("stage1", 3)}
    assert not model.neck[0].enabled and model.body[0][0].enabled
    x = torch.randn(1, 3, 6, 6)
    neck = model.neck[0]
    ref = torch.nn.functional.conv2d(model.body(model.stem(x)), neck.weight, None)
    assert torch.equal(neck(model.body(model.stem(x))), ref)  # float until its stage starts
    assert apply_stages(model, policy, 2) == ["body.0.0", "body.1.0"]
    assert apply_stages(model, policy, 3) == ["body.0.0", "body.1.0", "neck.0"]
    assert neck.enabled
    # unstaged layers start at epoch 0
    policy2 = {"stages": [{"layers": ["neck"], "epoch": 5}]}
    model2, _ = binarize(Tiny(), policy2)
    g = {g.name: (g.epoch, g.paths) for g in stage_groups(model2, policy2)}
    assert g == {"stage0": (5, ["neck.0"]), "unstaged": (0, ["body.0.0", "body.1.0"])}
    assert apply_stages(model2, policy2, 0) == ["body.0.0", "body.1.0"]


def test_torchvision_mobilenet_v2():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2(weights=None)
    n_dw = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    model, rep = binarize(model)
    r = reasons(rep)
    assert r["features.0.0"] == "first conv"
    assert r["features.18.0"] == "prediction conv"  # fallback: last conv in registration order
    assert sum(v == "depthwise" for v in r.values()) == n_dw == 17
    assert len(rep.converted) == 52 - 2 - 17
    for path, layer in binary_convs(model).items():
        assert layer.groups == 1, path
    model.eval()
    out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    res = summary(model, (32, 32), print_fn=None)
    t = res["totals"]
    assert t["packed_bytes"] == packed_model_bytes(model)
    assert t["float32_bytes"] == 4 * (sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked")))
    # depthwise convs, the 1280-wide last conv and the classifier stay float: a modest ratio
    assert 1.5 < t["compression"] < 3


@pytest.fixture(scope="module")
def yolov8n():
    pytest.importorskip("ultralytics")
    from kd_bnn.offline import import_ultralytics

    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    from kd_bnn.models.ultralytics import UltralyticsDetector

    torch.manual_seed(0)
    return UltralyticsDetector(DetectionModel("yolov8n.yaml", nc=3, verbose=False), ["a", "b", "c"], (64, 64))


def test_ultralytics_yolov8n(yolov8n):
    model = copy.deepcopy(yolov8n).eval()
    model, rep = binarize(model)
    r = reasons(rep)
    preds = sorted(p for p, v in r.items() if v == "prediction conv")
    assert preds == [f"model.model.22.{cv}.{i}.2" for cv in ("cv2", "cv3") for i in range(3)]
    assert r["model.model.0.conv"] == "first conv"
    assert r["model.model.22.dfl.conv"] == "DFL (fixed weights)"
    assert all(v == "converted" for p, v in r.items()
               if p not in preds and p not in ("model.model.0.conv", "model.model.22.dfl.conv"))
    assert isinstance(model.model.model[1].conv, BinaryConv2d)
    y = model(torch.rand(1, 3, 64, 64))
    assert [t.shape for t in y] == [(1, 64 + 3, 64 // s, 64 // s) for s in (8, 16, 32)]
    assert all(torch.isfinite(t).all() for t in y)


def test_keep_pointwise_and_strided_policy_options():
    """Fully binary students keep 1x1 and downsampling convs float (Bi-Real/ReActNet practice);
    the report names each with its reason, and naming a conv exactly still converts it."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1))
    _, rep = binarize(copy.deepcopy(model), {"keep_pointwise": True, "keep_strided": True})
    r = reasons(rep)
    assert r == {"0": "first conv", "1": "converted", "2": "1x1 (keep_pointwise)",
                 "3": "stride 2 (keep_strided)", "4": "converted", "5": "prediction conv"}
    _, rep = binarize(copy.deepcopy(model), {"keep_pointwise": True, "include": ["*", "2"]})
    assert reasons(rep)["2"] == "converted"  # named exactly: the user's word wins
