"""Quantizers and scaling factors against their formulas (BinaryConnect, BinaryNet, Bi-Real, XNOR-Net)."""

from __future__ import annotations

import pytest
import torch

from kd_bnn.binary.quantizers import (
    QUANTIZERS,
    build_quantizer,
    hard_sigmoid,
    mean_abs_scale,
    scaled_binary_weight,
    xnor_k,
)

torch.manual_seed(0)


@pytest.mark.parametrize("name", QUANTIZERS.list())
def test_registered_quantizers_are_exactly_binary_and_sign_zero_is_plus_one(name):
    q = build_quantizer(name, clip=1.0).eval()
    x = torch.tensor([-3.0, -1.0, -1e-8, 0.0, -0.0, 1e-8, 0.5, 4.0])
    y = q(x)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    # training-mode outputs are binary too
    q.train()
    y = q(torch.randn(1000))
    assert set(y.unique().tolist()) <= {-1.0, 1.0}


def test_registry_names():
    assert {"ste_sign", "stochastic_sign", "approx_sign"} <= set(QUANTIZERS.list())


def test_unknown_quantizer_and_bad_clip():
    with pytest.raises(ValueError, match="ste_sign") as e:
        build_quantizer("ste_sing")
    assert "did you mean" in str(e.value)
    for clip in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip must be > 0"):
            build_quantizer("ste_sign", clip=clip)


@pytest.mark.parametrize("clip", [1.0, 1.3])
def test_ste_gradient_is_indicator_of_clip_window(clip):
    x = torch.tensor([-2.0, -1.3, -1.0, -0.5, 0.0, 0.7, 1.0, 1.2, 1.3, 1.31, 5.0], requires_grad=True)
    g = torch.randn(x.shape)
    QUANTIZERS.build("ste_sign", clip=clip)(x).backward(g)
    expected = g * (x.detach().abs() <= clip).float()
    assert torch.equal(x.grad, expected)


def test_approx_sign_gradient_is_bireal_polynomial():
    x = torch.linspace(-1.5, 1.5, 31, requires_grad=True)
    g = torch.randn(x.shape)
    QUANTIZERS.build("approx_sign")(x).backward(g)
    xa = x.detach().abs()
    expected = torch.where(xa <= 1, g * (2 - 2 * xa), torch.zeros_like(g))
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-6)


def test_approx_sign_wider_window_keeps_area():
    x = torch.linspace(-2.0, 2.0, 4001, requires_grad=True)
    QUANTIZERS.build("approx_sign", clip=1.3)(x).sum().backward()
    assert (x.grad[x.detach().abs() > 1.3] == 0).all()
    area = torch.trapezoid(x.grad, x.detach())
    assert abs(area.item() - 2.0) < 1e-3  # integral of dq/dx over the window = q(+inf) - q(-inf)


def test_stochastic_sign_mean_is_hard_sigmoid():
    gen_state = torch.get_rng_state()
    torch.manual_seed(123)
    xs = torch.tensor([-1.5, -0.8, -0.3, 0.0, 0.25, 0.6, 0.95, 2.0])
    n = 20000
    q = QUANTIZERS.build("stochastic_sign").train()
    draws = q(xs.expand(n, -1).contiguous())
    p = hard_sigmoid(xs)
    mean = draws.mean(0)
    expected = 2 * p - 1
    sigma = 2 * torch.sqrt(p * (1 - p) / n)
    assert ((mean - expected).abs() <= 5 * sigma + 1e-9).all(), (mean, expected)
    # the extremes are deterministic
    assert mean[0] == -1 and mean[-1] == 1
    torch.set_rng_state(gen_state)


def test_stochastic_sign_gradient_is_ste_and_eval_is_deterministic():
    x = torch.tensor([-1.5, -0.5, 0.0, 0.5, 1.5], requires_grad=True)
    q = QUANTIZERS.build("stochastic_sign")
    q.train()(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    q.eval()
    assert torch.equal(q(x.detach()), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))


def test_mean_abs_alpha_is_exact_for_already_binary_weights():
    a = torch.rand(16) * 3 + 1e-3
    signs = torch.where(torch.rand(16, 37, 3, 3) < 0.5, -1.0, 1.0)
    w = signs * a.view(-1, 1, 1, 1)
    assert torch.equal(mean_abs_scale(w), a)
    w2 = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(mean_abs_scale(w2), w2.abs().mean(dim=(1, 2, 3)))


def test_mean_abs_paper_gradient_matches_xnor_net_formula():
    """dC/dW_i = dC/dW~_i * (1/n + alpha * 1{|W_i| <= clip}) (Rastegari et al. 2016)."""
    w = (torch.randn(6, 4, 3, 3) * 0.8).requires_grad_(True)
    g = torch.randn(w.shape)
    q = QUANTIZERS.build("ste_sign", clip=1.0)
    wt = scaled_binary_weight(w, q, "mean_abs", alpha_grad="paper")
    wd = w.detach()
    alpha = wd.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(wt.detach(), torch.where(wd >= 0, 1.0, -1.0) * mean_abs_scale(wd).view(-1, 1, 1, 1))
    wt.backward(g)
    n = 4 * 3 * 3
    expected = g * (1.0 / n + alpha * (wd.abs() <= 1.0).float())
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-7)


def test_mean_abs_autograd_gradient_is_exact_chain_rule():
    w = (torch.randn(3, 2, 3, 3) * 0.8).requires_grad_(True)
    g = torch.randn(w.shape)
    wt = scaled_binary_weight(w, QUANTIZERS.build("ste_sign"), "mean_abs", alpha_grad="autograd")
    wt.backward(g)
    wd = w.detach()
    s = torch.where(wd >= 0, 1.0, -1.0)
    n = wd[0].numel()
    alpha = wd.abs().mean(dim=(1, 2, 3), keepdim=True)
    cross = (g * s).sum(dim=(1, 2, 3), keepdim=True)
    expected = alpha * (wd.abs() <= 1).float() * g + s / n * cross
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-6)


def test_learned_and_none_scaling():
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    scale = torch.tensor([0.5, 2.0, 1.5], requires_grad=True)
    g = torch.randn(w.shape)
    q = QUANTIZERS.build("ste_sign")
    wt = scaled_binary_weight(w, q, "learned", scale)
    wt.backward(g)
    s = torch.where(w.detach() >= 0, 1.0, -1.0)
    torch.testing.assert_close(scale.grad, (g * s).sum(dim=(1, 2, 3)))
    assert torch.equal(scaled_binary_weight(w, q, "none").detach(), s)
    with pytest.raises(ValueError, match=r"unknown weight scaling 'median'; registered: learned, mean_abs, none"):
        scaled_binary_weight(w, q, "median")


def test_weight_scalings_are_one_registry_used_by_layer_and_export():
    """One definition per scaling: the layer's training weight and the exported alpha agree."""
    from kd_bnn.binary.layers import BinaryConv2d
    from kd_bnn.binary.quantizers import WEIGHT_SCALINGS

    assert WEIGHT_SCALINGS.list() == ["learned", "mean_abs", "none"]
    torch.manual_seed(0)
    for name in WEIGHT_SCALINGS.list():
        m = BinaryConv2d(4, 3, 3, padding=1, weight_scaling=name)
        alpha = m.weight_scale()
        assert alpha.shape == (3,) and (m.scale is not None) == (name == "learned")
        torch.testing.assert_close(m.effective_weight().detach(), m.binary_weight())
        if name == "none":
            assert torch.equal(alpha, torch.ones(3))


def test_xnor_k_matches_loop_reference():
    x = torch.randn(2, 5, 7, 6)
    pad = (1, 2, 0, 1)  # left, right, top, bottom
    k = xnor_k(x, (3, 2), (2, 1), pad, (1, 1))
    a = x.abs().mean(1)  # (2, 7, 6)
    ap = torch.zeros(2, 7 + 0 + 1, 6 + 1 + 2)
    ap[:, 0:7, 1:7] = a
    ho = (ap.shape[1] - 3) // 2 + 1
    wo = (ap.shape[2] - 2) // 1 + 1
    ref = torch.zeros(2, 1, ho, wo)
    for i in range(ho):
        for j in range(wo):
            ref[:, 0, i, j] = ap[:, 2 * i:2 * i + 3, j:j + 2].mean(dim=(1, 2))
    torch.testing.assert_close(k, ref)
