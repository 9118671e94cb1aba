"""Sign quantizers with surrogate gradients, and the scaling factors of binary layers.

Quantizers are small ``nn.Module`` classes registered by name in :data:`QUANTIZERS` (the larq
habit: a string alias, the formula in the docstring, a reference), so a config names them as
strings (``weight_quantizer: ste_sign``). Every quantizer maps to exactly {-1, +1}: sign(0) = +1,
never 0, because 0 is not a value a bit can hold.

Weight scalings (per output channel ``alpha``) are registered in :data:`WEIGHT_SCALINGS` too:
``none``, ``mean_abs`` (XNOR-Net BWN), ``learned``; each says how its alpha is made (and trained)
and what the exporter stores, so layers, training and export share one definition. Activation
scaling for XNOR layers (:data:`INPUT_SCALINGS`): ``none``, ``xnor_k`` (XNOR-Net's K map).

Example:
    >>> q = QUANTIZERS.build("ste_sign", clip=1.3)
    >>> q(torch.tensor([-0.2, 0.0, 2.0]))
    tensor([-1.,  1.,  1.])
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.registry import Registry

#: name -> quantizer class; ``QUANTIZERS.build(name, clip=...)`` returns a module.
QUANTIZERS = Registry("quantizer")
#: name -> weight scaling class (:class:`WeightScaling`), as accepted by ``BinaryConv2d``.
WEIGHT_SCALINGS = Registry("weight scaling")
#: Activation scaling names accepted by xnor-mode :class:`~kd_bnn.binary.layers.BinaryConv2d`.
INPUT_SCALINGS = ("none", "xnor_k")
#: How the gradient flows through the ``mean_abs`` alpha (see :func:`scaled_binary_weight`).
ALPHA_GRADS = ("paper", "autograd")


def sign(x: torch.Tensor) -> torch.Tensor:
    """Deterministic sign with sign(0) = +1 (values exactly in {-1, +1}, same dtype as ``x``)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """clip((x + 1) / 2, 0, 1) — the probability of +1 in BinaryConnect's stochastic sign."""
    return ((x + 1) / 2).clamp(0.0, 1.0)


def _check_clip(clip: float) -> float:
    clip = float(clip)
    if not clip > 0:
        raise ValueError(f"quantizer clip must be > 0, found {clip}")
    return clip


class _SteSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class _ApproxSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        c = ctx.clip
        surrogate = (2.0 / c) * (1.0 - x.abs() / c)
        return grad * surrogate.clamp_min(0.0), None


class _StochasticSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.bernoulli(hard_sigmoid(x)) * 2 - 1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def ste_sign(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """sign(x) forward; straight-through gradient ``grad * 1{|x| <= clip}`` backward."""
    return _SteSignFn.apply(x, _check_clip(clip))


def approx_sign(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """sign(x) forward; gradient ``grad * (2/c)(1 - |x|/c)`` for |x| <= c, else 0 (c = clip)."""
    return _ApproxSignFn.apply(x, _check_clip(clip))


def stochastic_sign(x: torch.Tensor, clip: float = 1.0, training: bool = True) -> torch.Tensor:
    """+1 with probability hard_sigmoid(x) when training, deterministic sign otherwise (STE grad)."""
    if not training:
        return ste_sign(x, clip)
    return _StochasticSignFn.apply(x, _check_clip(clip))


class Quantizer(nn.Module):
    """Base class: maps a tensor to {-1, +1} with a surrogate gradient. No parameters."""

    name: str = ""

    def __init__(self, clip: float = 1.0):
        super().__init__()
        self.clip = _check_clip(clip)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


@QUANTIZERS.register("ste_sign")
class SteSign(Quantizer):
    """Sign with the straight-through estimator (BinaryNet).

    Forward: q(x) = +1 if x >= 0 else -1 (sign(0) = +1).
    Backward: dq/dx = 1 if |x| <= clip else 0 (clip = 1 in BinaryNet, 1.3 in BinaryDenseNet).

    # References
    Courbariaux et al., "Binarized Neural Networks" (2016); Bethge et al., "BinaryDenseNet" (2019).
    """

    name = "ste_sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste_sign(x, self.clip)


@QUANTIZERS.register("approx_sign")
class ApproxSign(Quantizer):
    """Sign with Bi-Real Net's piecewise-polynomial gradient.

    Forward: sign(x) (sign(0) = +1).
    Backward: dq/dx = 2 - 2|x| for |x| <= 1, else 0. With ``clip = c`` != 1 the window is
    widened to |x| <= c as dq/dx = (2/c)(1 - |x|/c) (same area; c = 1 is the paper's form).

    # References
    Liu et al., "Bi-Real Net" (ECCV 2018), eq. (3).
    """

    name = "approx_sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_sign(x, self.clip)


@QUANTIZERS.register("stochastic_sign")
class StochasticSign(Quantizer):
    """BinaryConnect's stochastic binarization.

    Forward (training): +1 with probability p = hard_sigmoid(x) = clip((x+1)/2, 0, 1), else -1,
    so E[q(x)] = 2p - 1. Forward (eval): deterministic sign (sign(0) = +1).
    Backward: straight-through, dq/dx = 1 if |x| <= clip else 0.

    # References
    Courbariaux et al., "BinaryConnect" (NeurIPS 2015), eq. (3).
    """

    name = "stochastic_sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_sign(x, self.clip, self.training)


def build_quantizer(name: str, clip: float = 1.0) -> Quantizer:
    """Build a registered quantizer; unknown names or clip <= 0 raise ValueError naming the options."""
    try:
        cls = QUANTIZERS.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return cls(clip=clip)


# ----------------------------------------------------------------------------- scaling


def mean_abs_scale(weight: torch.Tensor) -> torch.Tensor:
    """XNOR-Net BWN alpha = ||W_c||_1 / n per output channel c, shape (C_out,), no gradient.

    Computed in float64 and cast back, so a weight that is already ±a per channel gives alpha == a
    exactly (n copies of a float32 sum exactly in float64); converting a binary weight is lossless.

    # References
    Rastegari et al., "XNOR-Net" (ECCV 2016), eq. (4).
    """
    w = weight.detach()
    return w.abs().to(torch.float64).flatten(1).mean(dim=1).to(w.dtype)


class WeightScaling(ABC):
    """The per-output-channel alpha of a binary weight ``alpha_c * q(W)``.

    ``learned`` classes own a trained (C_out,) parameter (``BinaryConv2d.scale``), initialised by
    :meth:`init`; :meth:`alpha` is what the exporter stores; :meth:`effective` is the float weight
    the layer trains with (and its gradient through alpha).
    """

    learned = False

    def init(self, weight: torch.Tensor) -> torch.Tensor | None:
        return None

    @abstractmethod
    def alpha(self, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Per-output-channel alpha (C_out,), as the exporter stores it."""

    @abstractmethod
    def effective(self, weight: torch.Tensor, wb: torch.Tensor, scale: torch.Tensor | None,
                  alpha_grad: str) -> torch.Tensor:
        """The float weight ``alpha * q(W)`` the layer trains with (``wb`` = q(W))."""


def _channel_shape(weight: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (weight.dim() - 1)


@WEIGHT_SCALINGS.register("none")
class NoScaling(WeightScaling):
    """alpha = 1: the weight is q(W)."""

    def alpha(self, weight, scale):
        return torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)

    def effective(self, weight, wb, scale, alpha_grad):
        return wb


@WEIGHT_SCALINGS.register("mean_abs")
class MeanAbsScaling(WeightScaling):
    """alpha = mean |W| per output channel (XNOR-Net BWN, Rastegari et al. 2016, eq. 4).

    ``alpha_grad="paper"``: forward alpha * q(W); backward XNOR-Net's
    dC/dW_i = dC/dW~_i * (1/n + alpha * q'(W_i)) (sec. 3.1, gradient of W~ = alpha * sign(W)), q'
    the quantizer's surrogate (for ``ste_sign``: 1{|W_i| <= clip}); implemented as
    ``alpha.detach() * q(W) + (W - W.detach()) / n``, whose second term is zero forward and
    contributes grad/n backward. ``alpha_grad="autograd"``: plain autograd of alpha(W) * q(W), i.e.
    dC/dW_i = alpha q'(W_i) g_i + sign(W_i)/n * sum_j g_j q(W_j) (the exact chain rule).
    """

    def alpha(self, weight, scale):
        return mean_abs_scale(weight)

    def effective(self, weight, wb, scale, alpha_grad):
        shape = _channel_shape(weight)
        if alpha_grad == "paper":
            n = weight[0].numel()
            return mean_abs_scale(weight).view(shape) * wb + (weight - weight.detach()) / n
        if alpha_grad == "autograd":
            alpha = weight.abs().to(torch.float64).flatten(1).mean(dim=1).to(weight.dtype)
            return alpha.view(shape) * wb
        raise ValueError(f"alpha_grad must be one of {ALPHA_GRADS}, found {alpha_grad!r}")


@WEIGHT_SCALINGS.register("learned")
class LearnedScaling(WeightScaling):
    """alpha a trained (C_out,) parameter, initialised to mean |W|; plain autograd (both the latent
    weights and alpha get gradients), as XNOR-Net++ (Bulat & Tzimiropoulos, BMVC 2019) learns it."""

    learned = True

    def init(self, weight):
        return mean_abs_scale(weight)

    def alpha(self, weight, scale):
        if scale is None:
            raise ValueError("weight_scaling 'learned' needs a scale parameter")
        return scale.detach().clone()

    def effective(self, weight, wb, scale, alpha_grad):
        if scale is None:
            raise ValueError("weight_scaling 'learned' needs a scale parameter")
        return scale.view(_channel_shape(weight)) * wb


def weight_scaling(name: str) -> WeightScaling:
    """The registered weight scaling ``name`` (ValueError listing the registered ones otherwise)."""
    try:
        return WEIGHT_SCALINGS.get(name)()
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def scaled_binary_weight(
    weight: torch.Tensor,
    quantizer: nn.Module,
    scaling: str = "mean_abs",
    scale: torch.Tensor | None = None,
    alpha_grad: str = "paper",
) -> torch.Tensor:
    """Effective weight alpha_c * q(W) of a binary layer, with the gradient through alpha that the
    registered scaling defines (:class:`MeanAbsScaling`, :class:`LearnedScaling`, :class:`NoScaling`)."""
    return weight_scaling(scaling).effective(weight, quantizer(weight), scale, alpha_grad)


def xnor_k(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """XNOR-Net's activation scale K = A * k, shape (B, 1, H_out, W_out).

    A = mean over input channels of |x| (B, 1, H, W); k a (kh, kw) box filter of value 1/(kh*kw)
    applied with the conv's stride and dilation. ``pad`` = (left, right, top, bottom): A is padded
    with 0 (the padded input carries no magnitude), whatever the binary pad value is.

    # References
    Rastegari et al., "XNOR-Net" (ECCV 2016), sec. 3.2, eq. (11).
    """
    a = x.abs().mean(dim=1, keepdim=True)
    if any(pad):
        a = F.pad(a, pad, value=0.0)
    kh, kw = kernel_size
    box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
    return F.conv2d(a, box, stride=stride, dilation=dilation)
