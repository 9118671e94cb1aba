"""`BinaryConv2d`: a drop-in ``nn.Conv2d`` with binary weights (BWN) or binary weights and inputs (XNOR).

The layer keeps the float *latent* weights (``self.weight``) that the optimizer updates; the
forward uses ``alpha_c * sign(W)`` (BinaryConnect / XNOR-Net BWN, Xu et al. 2019). In ``xnor``
mode the input is binarized too (BinaryNet / XNOR-Net) and padded by the layer itself with
``pad_value`` (+1 or -1): 0 is not a binary value, and the deployment kernel pads the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.binary.quantizers import (
    ALPHA_GRADS,
    INPUT_SCALINGS,
    build_quantizer,
    sign,
    xnor_k,
)
from kd_bnn.binary.quantizers import weight_scaling as weight_scaling_of

MODES = ("bwn", "xnor")


def conv_explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The conv's zero padding as (left, right, top, bottom), resolving 'same'/'valid' as PyTorch does.

    For ``padding='same'`` the total padding d*(k-1) per dimension is split as total//2 before
    and the rest after (the extra pixel goes right/bottom), which is what ``nn.Conv2d`` does.
    """
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def is_depthwise(conv: nn.Conv2d) -> bool:
    """True for a depthwise conv: one input channel per group (groups == in_channels > 1)."""
    return conv.groups > 1 and conv.groups == conv.in_channels


class BinaryConv2d(nn.Conv2d):
    """Conv2d with binary weights (``mode='bwn'``) or binary weights and inputs (``mode='xnor'``).

    Args (beyond ``nn.Conv2d``'s):
        mode: "bwn" (binary weights, float activations) or "xnor" (both binary).
        weight_quantizer / input_quantizer: registered quantizer names (``QUANTIZERS``).
        clip: STE window of the quantizers and the range ``clip_latent_weights`` clamps to.
        weight_scaling: "none" | "mean_abs" (XNOR-Net alpha) | "learned" (per-channel parameter
            ``self.scale``, initialised to the mean |W| of the weights it starts from).
        input_scaling: "none" | "xnor_k" (xnor mode only).
        pad_value: +1 or -1, the value binary activations are padded with (xnor mode).
        enabled: False makes the layer behave exactly as the float conv (staged binarization).
        alpha_grad: "paper" (XNOR-Net's gradient through alpha) or "autograd"; see
            :func:`~kd_bnn.binary.quantizers.scaled_binary_weight`.

    In xnor mode: y = conv(pad(q(x), pad_value), alpha * q(W), padding=0) [* K] + bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        mode: str = "bwn",
        weight_quantizer: str = "ste_sign",
        input_quantizer: str = "ste_sign",
        clip: float = 1.0,
        weight_scaling: str = "mean_abs",
        input_scaling: str = "none",
        pad_value: float = -1.0,
        enabled: bool = True,
        alpha_grad: str = "paper",
        _skip_init: bool = False,
    ):
        self._skip_init = _skip_init  # from_conv copies the weights: no random init to throw away
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        if mode not in MODES:
            raise ValueError(f"BinaryConv2d mode must be one of {MODES}, found {mode!r}")
        scaling = weight_scaling_of(weight_scaling)
        if input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, found {input_scaling!r}")
        if alpha_grad not in ALPHA_GRADS:
            raise ValueError(f"alpha_grad must be one of {ALPHA_GRADS}, found {alpha_grad!r}")
        if float(pad_value) not in (1.0, -1.0):
            raise ValueError(f"pad_value must be +1 or -1 (a binary value), found {pad_value}")
        if mode == "xnor" and padding_mode != "zeros":
            raise ValueError(f"xnor mode pads with pad_value itself; padding_mode {padding_mode!r} is not supported")
        self.mode = mode
        self.clip = float(clip)
        self.weight_scaling = weight_scaling
        self.input_scaling = input_scaling
        self.pad_value = float(pad_value)
        self.enabled = bool(enabled)
        self.float_weights = False  # two-stage training's stage 1: binary inputs, float weights
        self.alpha_grad = alpha_grad
        self.weight_quantizer = build_quantizer(weight_quantizer, clip)
        self.input_quantizer = build_quantizer(input_quantizer, clip) if mode == "xnor" else None
        self._scaling = scaling
        if scaling.learned:
            self.scale = nn.Parameter(scaling.init(self.weight))
        else:
            self.register_parameter("scale", None)

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        if not self.__dict__.get("_skip_init", False):
            super().reset_parameters()
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **opts) -> BinaryConv2d:
        """A BinaryConv2d with ``conv``'s geometry, device, dtype, train mode and (copied) weights/bias."""
        if isinstance(conv, BinaryConv2d):
            raise TypeError("from_conv: the conv is already a BinaryConv2d")
        w = conv.weight
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=w.device, dtype=w.dtype, _skip_init=True, **opts)
        with torch.no_grad():
            new.weight.copy_(w)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(w.requires_grad)
        if conv.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        new._skip_init = False
        new.reset_scale()
        new.train(conv.training)
        return new

    def reset_scale(self) -> None:
        """Set a ``learned`` scale to the mean |W| of the current latent weights (no-op otherwise)."""
        if self.scale is not None:
            with torch.no_grad():
                self.scale.copy_(self._scaling.init(self.weight))

    # ------------------------------------------------------------------ what the exporter reads
    def weight_signs(self) -> torch.Tensor:
        """Signs of the latent weights as a bool tensor (True = +1, sign(0) = +1), weight's shape."""
        return self.weight.detach() >= 0

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel alpha, shape (C_out,), as the registered scaling defines it (mean |W|,
        the learned scale, or ones): what the exporter stores."""
        return self._scaling.alpha(self.weight, self.scale)

    def binary_weight(self) -> torch.Tensor:
        """The effective ±alpha float weight (deterministic sign), same shape as ``weight``."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return sign(self.weight.detach()) * self.weight_scale().view(shape)

    def explicit_padding(self) -> tuple[int, int, int, int]:
        """Padding as (left, right, top, bottom)."""
        return conv_explicit_padding(self)

    # ------------------------------------------------------------------ forward
    def effective_weight(self) -> torch.Tensor:
        """alpha * q(W) with gradients to the latent weights (and a learned scale)."""
        return self._scaling.effective(self.weight, self.weight_quantizer(self.weight), self.scale, self.alpha_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self._conv_forward(x, self.weight, self.bias)
        w = self.weight if self.float_weights else self.effective_weight()
        if self.mode == "bwn":
            return self._conv_forward(x, w, self.bias)
        pad = self.explicit_padding()
        xb = self.input_quantizer(x)
        if any(pad):
            xb = F.pad(xb, pad, value=self.pad_value)
        if self.input_scaling == "xnor_k":
            y = F.conv2d(xb, w, None, self.stride, 0, self.dilation, self.groups)
            y = y * xnor_k(x, self.kernel_size, self.stride, pad, self.dilation)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        return F.conv2d(xb, w, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", mode={self.mode}, weight_scaling={self.weight_scaling}"
        if self.mode == "xnor":
            s += f", input_scaling={self.input_scaling}, pad_value={self.pad_value:+g}"
        if not self.enabled:
            s += ", enabled=False"
        if self.float_weights:
            s += ", float_weights=True"
        return s


def binary_convs(model: nn.Module) -> dict[str, BinaryConv2d]:
    """Module path -> BinaryConv2d, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}


def set_float_weights(model: nn.Module, on: bool) -> int:
    """Stage 1 of two-stage training (ReActNet, Liu et al. 2020): ``on`` makes every BinaryConv2d
    use its latent float weights (inputs still binary in xnor mode); ``off`` restores binary
    weights and re-initialises a learned scale from the weights trained in stage 1. Not saved in
    the state dict. Returns the number of layers set."""
    count = 0
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.float_weights = bool(on)
            if not on:
                m.reset_scale()
            count += 1
    return count


@torch.no_grad()
def clip_latent_weights(model: nn.Module, clip: float | None = None,
                        include_disabled: bool = False) -> int:
    """Clamp the latent weights of the model's BinaryConv2d layers to [-clip, clip] in place.

    Call after each optimizer step (BinaryConnect). ``clip=None`` uses each layer's own ``clip``.
    Layers with ``enabled=False`` (whose stage has not started) behave as float convs and are
    left alone unless ``include_disabled``. Returns the number of layers clipped.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, BinaryConv2d) and (m.enabled or include_disabled):
            c = m.clip if clip is None else float(clip)
            if not c > 0:
                raise ValueError(f"clip must be > 0, found {c}")
            m.weight.clamp_(-c, c)
            count += 1
    return count
