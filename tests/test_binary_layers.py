"""BinaryConv2d against plain F.conv2d references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d, clip_latent_weights, conv_explicit_padding


def _sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


def _alpha(layer: BinaryConv2d) -> torch.Tensor:
    w = layer.weight.detach()
    if layer.weight_scaling == "mean_abs":
        return w.abs().mean(dim=(1, 2, 3))
    if layer.weight_scaling == "learned":
        return layer.scale.detach()
    return torch.ones(w.shape[0])


def _manual_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int, value: float) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.full((b, c, h + top + bottom, w + left + right), value)
    out[:, :, top:top + h, left:left + w] = x
    return out


GEOMS = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1, bias=True),
    dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=1, bias=False),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=2, bias=True),
    dict(kernel_size=1, stride=1, padding=0, dilation=1, groups=1, bias=True),
]


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("scaling", ["none", "mean_abs", "learned"])
def test_bwn_forward_equals_conv_with_sign_times_alpha(geom, scaling):
    torch.manual_seed(1)
    layer = BinaryConv2d(4, 6, mode="bwn", weight_scaling=scaling, **geom)
    if scaling == "learned":
        with torch.no_grad():
            layer.scale.copy_(torch.rand(6) + 0.5)
    x = torch.randn(2, 4, 9, 8)
    wref = _sign(layer.weight.detach()) * _alpha(layer).view(-1, 1, 1, 1)
    ref = F.conv2d(x, wref, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.binary_weight(), wref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pad_value", [1.0, -1.0])
@pytest.mark.parametrize("geom", GEOMS)
def test_xnor_forward_equals_conv_of_manually_padded_sign(pad_value, geom):
    torch.manual_seed(2)
    layer = BinaryConv2d(4, 6, mode="xnor", pad_value=pad_value, **geom)
    x = torch.randn(2, 4, 9, 8)
    left, right, top, bottom = conv_explicit_padding(layer)
    xp = _manual_pad(_sign(x), left, right, top, bottom, pad_value)
    wref = _sign(layer.weight.detach()) * _alpha(layer).view(-1, 1, 1, 1)
    ref = F.conv2d(xp, wref, layer.bias, layer.stride, 0, layer.dilation, layer.groups)
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if any((left, right, top, bottom)):  # zero padding of sign(x) would give something else
        zero = F.conv2d(_sign(x), wref, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        assert not torch.allclose(out, zero)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_xnor_k_scaling_and_same_padding():
    torch.manual_seed(3)
    layer = BinaryConv2d(3, 5, 4, padding="same", mode="xnor", input_scaling="xnor_k", pad_value=1.0)
    assert conv_explicit_padding(layer) == (1, 2, 1, 2)
    x = torch.randn(1, 3, 7, 7)
    xp = _manual_pad(_sign(x), 1, 2, 1, 2, 1.0)
    wref = _sign(layer.weight.detach()) * _alpha(layer).view(-1, 1, 1, 1)
    a = _manual_pad(x.abs().mean(1, keepdim=True), 1, 2, 1, 2, 0.0)
    k = F.avg_pool2d(a, 4, stride=1)
    ref = F.conv2d(xp, wref) * k + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # 'same' geometry in bwn mode matches PyTorch's own 'same'
    bwn = BinaryConv2d(3, 5, 4, padding="same", mode="bwn")
    ref = F.conv2d(x, bwn.binary_weight(), bwn.bias, padding="same")
    torch.testing.assert_close(bwn(x), ref, rtol=1e-5, atol=1e-5)


def test_xnor_input_gradient_is_ste():
    torch.manual_seed(4)
    layer = BinaryConv2d(2, 3, 3, padding=1, mode="xnor", clip=1.0)
    x = (torch.randn(1, 2, 5, 5) * 1.5).requires_grad_(True)
    layer(x).sum().backward()
    assert (x.grad[x.detach().abs() > 1.0] == 0).all()
    assert (x.grad[x.detach().abs() <= 1.0] != 0).any()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_disabled_layer_is_the_float_conv():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    for mode in ("bwn", "xnor"):
        layer = BinaryConv2d.from_conv(conv, mode=mode)
        layer.enabled = False
        assert torch.equal(layer(x), conv(x))
        layer.enabled = True
        assert not torch.allclose(layer(x), conv(x))


def test_from_conv_copies_and_binary_weight_reproduces_float_exactly():
    torch.manual_seed(6)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=True).train(False)
    with torch.no_grad():
        a = torch.rand(7) + 0.01
        conv.weight.copy_(_sign(torch.randn_like(conv.weight)) * a.view(-1, 1, 1, 1))
    layer = BinaryConv2d.from_conv(conv)
    assert not layer.training
    assert layer.stride == conv.stride and layer.padding == conv.padding
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert layer.weight.data_ptr() != conv.weight.data_ptr()
    assert torch.equal(layer.binary_weight(), conv.weight)
    x = torch.randn(2, 5, 11, 9)
    assert torch.equal(layer(x), conv(x))
    # learned scale starts at mean |W|, so it reproduces the float conv too
    learned = BinaryConv2d.from_conv(conv, weight_scaling="learned")
    assert torch.equal(learned.scale.detach(), a)
    assert torch.equal(learned(x), conv(x))


def test_signs_scale_and_shapes():
    layer = BinaryConv2d(3, 4, 3, weight_scaling="none")
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 0, 0] = -0.5
    s = layer.weight_signs()
    assert s.dtype == torch.bool and s.shape == layer.weight.shape
    assert s.sum() == s.numel() - 1  # sign(0) = +1
    assert torch.equal(layer.weight_scale(), torch.ones(4))
    assert layer.binary_weight()[0, 0, 0, 0] == -1 and layer.binary_weight()[1, 2, 2, 2] == 1


def test_clip_latent_weights():
    model = nn.Sequential(BinaryConv2d(2, 3, 3, clip=1.3), nn.Conv2d(3, 3, 1), BinaryConv2d(3, 3, 1))
    with torch.no_grad():
        for m in model:
            m.weight.normal_(0, 3)
    floatw = model[1].weight.detach().clone()
    model[2].enabled = False
    before = model[2].weight.detach().clone()
    assert clip_latent_weights(model) == 1
    assert model[0].weight.abs().max() <= 1.3 and model[0].weight.abs().max() > 1.0
    assert torch.equal(model[1].weight, floatw)
    assert torch.equal(model[2].weight, before)
    assert clip_latent_weights(model, clip=0.5, include_disabled=True) == 2
    assert model[2].weight.abs().max() <= 0.5
    with pytest.raises(ValueError, match="clip"):
        clip_latent_weights(model, clip=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pad_value"):
        BinaryConv2d(2, 2, 3, mode="xnor", pad_value=0.0)
    with pytest.raises(ValueError, match="mode"):
        BinaryConv2d(2, 2, 3, mode="ternary")
    with pytest.raises(ValueError, match="ste_sign"):
        BinaryConv2d(2, 2, 3, weight_quantizer="sgn")
    with pytest.raises(ValueError, match="padding_mode"):
        BinaryConv2d(2, 2, 3, padding=1, padding_mode="reflect", mode="xnor")


def test_deepcopy_and_state_dict_round_trip():
    layer = BinaryConv2d(3, 4, 3, mode="xnor", weight_scaling="learned", pad_value=1.0)
    clone = copy.deepcopy(layer)
    assert set(layer.state_dict()) == {"weight", "bias", "scale"}
    fresh = BinaryConv2d(3, 4, 3, mode="xnor", weight_scaling="learned", pad_value=1.0)
    fresh.load_state_dict(clone.state_dict())
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(fresh(x), layer(x))
    assert "pad_value=+1" in repr(layer)


def test_float64_conv_keeps_dtype():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    layer = BinaryConv2d.from_conv(conv, mode="xnor", input_scaling="xnor_k")
    assert layer.weight.dtype == torch.float64 and layer.binary_weight().dtype == torch.float64
    assert layer(torch.randn(1, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["bwn", "xnor"])
def test_cuda_and_autocast(mode):
    torch.manual_seed(7)
    layer = BinaryConv2d(16, 8, 3, padding=1, mode=mode, input_scaling="xnor_k" if mode == "xnor" else "none").cuda()
    x = torch.randn(2, 16, 9, 9, device="cuda")
    cpu = copy.deepcopy(layer).cpu()
    torch.testing.assert_close(layer(x).cpu(), cpu(x.cpu()), rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.float16):
        y = layer(x)
    torch.testing.assert_close(y.float().cpu(), cpu(x.cpu()), rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
