"""Run an exported ``.kdbnn`` student on the CPU: binary layers on the packed kernels.

``Runtime(path)`` loads and validates the file (:func:`kd_bnn.deploy.format.load_container`:
corrupt, truncated, tampered (the compressed metadata included), older- or newer-version files
raise ``FormatError``), rebuilds the float module tree from the stored skeleton (a registered
family and its schema-checked options: :func:`kd_bnn.deploy.schema.build_skeleton`, no weights),
cuts the weight blobs by :func:`kd_bnn.deploy.schema.tensor_plan` of that tree and the layer
table (a table that does not fit the tree, or a blob whose length differs from the plan's, is
refused naming the module or blob), then

* replaces each binary conv by a :class:`PackedBinaryConv` holding only the packed sign words,
  alpha and the folded affine (scale/shift), which calls
  :func:`kd_bnn.deploy.kernels.xnor_conv2d` (mode ``xnor``, padding with the layer's
  ``pad_value``) or :func:`kd_bnn.deploy.kernels.bwn_conv2d` (mode ``bwn``);
* replaces each conv with a folded BatchNorm by a conv with bias, and that BN by ``Identity``;
* fuses a following LeakyReLU(0.1) / ReLU into a binary conv's kernel call when the structure
  makes it certain (the family's ``activation_blocks`` hook, e.g. a Darknet ``conv -> bn -> act``
  block, or consecutive conv, [folded BN], act children of an ``nn.Sequential``, where a float
  ``C_in <= 8`` stem conv also takes a following ``nn.MaxPool2d(2, 2)`` into its kernel call;
  the other ``nn.MaxPool2d(2, 2)`` run as `MaxPool2x2`);
* loads every other tensor by its state-dict name.

XNOR layers keep their sign words once, in the kernel's panel layout (``words`` is a view).
Where the family has a packed graph walk (`Detector.packed_plan` / ``packed_forward``, given this
module's :class:`PackedOps`), a layer whose consumers only need signs hands them packed bits
straight from the kernel (``output="packed"``): in a Darknet model XNOR blocks and the max-pools
between them (``sign(max x) = OR`` of the bits), the same signs with 32x less memory traffic.

``Runtime(x)`` returns the raw head maps of the student in eval mode; ``predict`` decodes them
with the skeleton's own ``predict``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_bnn.binary.blocks import BinaryBlock, LearnableBias, RPReLU, activation_slope
from kd_bnn.deploy.format import FormatError, load_container
from kd_bnn.deploy.kernels import (
    OutputMap,
    block_epilogue,
    bwn_conv2d,
    concat_packed,
    default_isa,
    output_affine,
    pointwise_conv2d,
    pointwise_weights,
    popcount_bounds,
    quantize_activations,
    sign_thresholds,
    stem_conv2d,
    w1a8_conv2d,
    weight_panel,
    xnor_conv2d,
)
from kd_bnn.deploy.quantize import check_activations, inverse_scale
from kd_bnn.deploy.schema import (
    binary_conv_spec,
    binary_options,
    build_skeleton,
    split_blobs,
    tensor_plan,
)

__all__ = ["PackedBinaryConv", "Runtime"]


class PackedBinaryConv(nn.Module):
    """A binary conv holding only packed weights: ``act(conv_b(x) * scale + shift)``.

    ``conv_b`` is ``sign(x) (*) sign(W)`` (xnor, exact integers from the XNOR kernel) or
    ``x (*) sign(W)`` (bwn); ``scale = alpha * bn_scale`` and ``shift = bn_shift`` (or the conv
    bias) per output channel. XNOR-Net's input scaling K (``xnor_k``) is applied in torch after
    the kernel.
    """

    def __init__(self, entry: dict[str, Any], words: torch.Tensor, alpha: torch.Tensor,
                 bn_scale: torch.Tensor | None, shift: torch.Tensor | None,
                 backend: str | None = None, act_scale: float | None = None):
        super().__init__()
        self.path = entry["path"]
        self.mode = entry["mode"]
        self.in_channels, self.out_channels = int(entry["in_channels"]), int(entry["out_channels"])
        self.kernel_size = tuple(int(v) for v in entry["kernel_size"])
        self.stride = tuple(int(v) for v in entry["stride"])
        self.dilation = tuple(int(v) for v in entry["dilation"])
        self.pad = tuple(int(v) for v in entry["padding"])  # left, right, top, bottom
        self.pad_value = float(entry["pad_value"])
        self.input_scaling = entry.get("input_scaling", "none")
        self.padding_mode = entry.get("padding_mode", "zeros")
        self.backend = backend
        self.activation = "none"
        if self.mode == "xnor":
            # the XNOR kernel reads the panel layout; `words` is a view of it (no second copy)
            panel = weight_panel(words)
            self.register_buffer("panel", panel)
            c_out = words.shape[0]
            self.register_buffer("words", panel[:, :c_out].t().reshape(words.shape))
        else:
            self.panel = None
            self.register_buffer("words", words.contiguous())
        self.register_buffer("alpha", alpha.float())
        self.register_buffer("bn_scale", None if bn_scale is None else bn_scale.float())
        self.register_buffer("shift", None if shift is None else shift.float())
        scale = self.alpha * (self.bn_scale if self.bn_scale is not None else 1.0)
        self.register_buffer("scale", scale.contiguous())
        self._sym = len(set(self.pad)) == 1
        self._kernel_ok = self.dilation == (1, 1) and self.stride[0] == self.stride[1]
        # W1A8 (kd_bnn.deploy.quantize): int8 input q = rint(x / act_scale), conv scale alpha * s
        self.act_scale = act_scale
        if act_scale is not None:
            if not (self.mode == "bwn" and self._kernel_ok and self._sym
                    and (self.padding_mode == "zeros" or not any(self.pad)) and self.input_scaling == "none"):
                raise FormatError(f"binary layer '{self.path}': 'act_scale' (8-bit activations) on a conv the "
                                  "W1A8 kernel does not run (needs bwn, symmetric zero padding, no dilation)")
            self.in_inv = inverse_scale(act_scale)
            self.register_buffer("qscale", (self.scale * torch.tensor(act_scale, dtype=torch.float32)).contiguous())

    def _act(self, v: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(v)
        if self.activation == "leaky":
            return torch.where(v > 0, v, v * 0.1)
        return v

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """Torch path for geometries the kernels do not take (dilation, non-square stride)."""
        from kd_bnn.deploy.pack import unpack_signs

        kh, kw = self.kernel_size
        w = unpack_signs(self.words, self.in_channels, kh, kw)
        if self.mode == "xnor":
            x = torch.where(x >= 0, 1.0, -1.0)
            x = F.pad(x, self.pad, value=self.pad_value) if any(self.pad) else x
        elif any(self.pad):
            x = F.pad(x, self.pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        y = F.conv2d(x, w, None, self.stride, 0, self.dilation)
        return y

    def threshold_ok(self) -> bool:
        """Whether ``forward`` takes a binarization ``threshold`` (an XNOR conv the kernel runs with
        the layer's symmetric padding, no input scaling)."""
        return self.mode == "xnor" and self._kernel_ok and self._sym and self.input_scaling != "xnor_k"

    def forward(self, x: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
        """The conv of ``x``; ``threshold`` (``threshold_ok()`` convs only): binarize ``x >= t[c]``
        instead of ``x >= 0`` (RSign's ``sign(x + b)`` with ``t = -b``, no shifted map)."""
        if threshold is not None:
            if not self.threshold_ok():
                raise ValueError("a binarization threshold needs an XNOR conv the kernel runs directly")
            kh, kw = self.kernel_size
            return xnor_conv2d(x, self.words, self.in_channels, (kh, kw), self.stride[0], self.pad[0],
                               self.pad_value, scale=self.scale, bias=self.shift, activation=self.activation,
                               panel=self.panel, backend=self.backend, threshold=threshold)
        if self.act_scale is not None:
            return self.w1a8(x)
        x = x.float()
        kh, kw = self.kernel_size
        xk = self.input_scaling == "xnor_k"
        if not self._kernel_ok:
            y = self._reference(x) * self.alpha.view(1, -1, 1, 1)
            return self._finish(y, x)
        pad = self.pad[0]
        xin = x
        if not self._sym or (self.mode == "bwn" and self.padding_mode != "zeros" and any(self.pad)):
            if self.mode == "xnor":
                xin = F.pad(x, self.pad, value=self.pad_value)
            else:
                xin = F.pad(x, self.pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
            pad = 0
        if self.mode == "xnor":
            if xk:
                y = xnor_conv2d(xin, self.words, self.in_channels, (kh, kw), self.stride[0], pad,
                                self.pad_value, scale=self.alpha, panel=self.panel, backend=self.backend)
                return self._finish(y, x)
            return xnor_conv2d(xin, self.words, self.in_channels, (kh, kw), self.stride[0], pad,
                               self.pad_value, scale=self.scale, bias=self.shift,
                               activation=self.activation, panel=self.panel, backend=self.backend)
        scale = self.alpha if self.bn_scale is None else self.scale
        # the kernels rebuild their table offsets per call: keeping them per layer (bwn_prepare,
        # w1a8_prepare) measured no faster on the KITTI-size DarkNet-19 (128.5 vs 127.7 ms) and
        # added 15-26 MB to its inference peak (39 -> 54-65 MB), Zen 5, 1 thread
        return bwn_conv2d(xin, self.words, scale, (kh, kw), self.stride[0], pad, bias=self.shift,
                          activation=self.activation, backend=self.backend)

    def w1a8(self, x: torch.Tensor, out_inv: float | None = None) -> torch.Tensor:
        """The W1A8 conv: ``x`` float (quantized here with the layer's scale) or int8 already in it;
        float output, or int8 in the next layer's scale when ``out_inv`` (its 1 / scale) is given."""
        xq = x if x.dtype == torch.int8 else quantize_activations(x, self.in_inv, backend=self.backend)
        kh, kw = self.kernel_size
        return w1a8_conv2d(xq, self.words, self.qscale, (kh, kw), self.stride[0], self.pad[0], bias=self.shift,
                           activation=self.activation, out_scale_inv=out_inv, backend=self.backend)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` = conv * alpha; apply K, BN scale, shift and the activation in torch."""
        if self.input_scaling == "xnor_k" and self.mode == "xnor":
            from kd_bnn.binary.quantizers import xnor_k

            y = y * xnor_k(x, self.kernel_size, self.stride, self.pad, self.dilation)
        if self.bn_scale is not None:
            y = y * self.bn_scale.view(1, -1, 1, 1)
        if self.shift is not None:
            y = y + self.shift.view(1, -1, 1, 1)
        return self._act(y)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, pad={self.pad}, mode={self.mode}, pad_value={self.pad_value:+g}, "
                f"activation={self.activation}" + ("" if self.act_scale is None else ", activations=int8"))


# ----------------------------------------------------------------------------- skeleton


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    if isinstance(holder, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        holder[int(name)] = new
    else:
        setattr(holder, name, new)


def _act_name(m: nn.Module) -> str | None:
    if isinstance(m, nn.LeakyReLU) and abs(m.negative_slope - 0.1) < 1e-12:
        return "leaky"
    if isinstance(m, nn.ReLU):
        return "relu"
    return None


class FusedBinaryBlock(nn.Module):
    """A `BinaryBlock` of packed convs with the activation after it, run as the conv kernel plus one
    in-place epilogue pass (`kd_bnn.deploy.kernels.block_epilogue`): the real shortcut add and the
    (R)PReLU, instead of four to six elementwise torch passes."""

    def __init__(self, block: BinaryBlock, act: nn.Module, backend: str | None = None):
        super().__init__()
        self.move, self.conv = block.move, block.conv
        self.kind = "none" if block.shortcut is None else block.shortcut.kind
        self.stride = 1 if block.shortcut is None else block.shortcut.stride
        c = self.conv.out_channels
        if isinstance(act, RPReLU):
            gamma, slope, zeta = act.gamma.detach(), act.slope.detach(), act.zeta.detach()
        else:
            gamma, zeta = torch.zeros(c), torch.zeros(c)
            slope = torch.full((c,), activation_slope(act))
        self.register_buffer("gamma", gamma.float().clone().contiguous())
        self.register_buffer("slope", slope.float().clone().contiguous())
        self.register_buffer("zeta", zeta.float().clone().contiguous())
        self.backend = backend
        #: fold RSign's shift into the XNOR conv's binarization (False: the shifted map, as trained)
        self.fuse_move = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        thr = self._threshold()
        if thr is not None:  # RSign's shift as the packer's per-channel threshold: no shifted map
            y = self.conv(x, threshold=thr).contiguous()
        else:
            y = self.conv(self.move(x)).contiguous()
        s = None
        if self.kind != "none":
            s = x if self.stride == 1 else F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True,
                                                        count_include_pad=False)
        return block_epilogue(y, s, self.kind, self.gamma, self.slope, self.zeta, backend=self.backend)

    def _threshold(self) -> torch.Tensor | None:
        """``-b`` of the RSign ``move`` when the packed XNOR conv can binarize against it
        (``sign(x + b)`` = ``x >= -b``), else None (``move`` runs as a module)."""
        if not self.fuse_move or not isinstance(self.move, LearnableBias) or not isinstance(self.conv, PackedBinaryConv):
            return None
        if self.conv.mode != "xnor" or not self.conv.threshold_ok():
            return None
        return (-self.move.bias.detach().float().reshape(-1)).contiguous()

    def extra_repr(self) -> str:
        return f"shortcut={self.kind}, stride={self.stride}"


def _fuse_blocks(model: nn.Module) -> int:
    """Replace each `BinaryBlock` of packed convs (BN folded) and the activation after it by a
    `FusedBinaryBlock`; returns how many."""
    count = 0
    blocks = getattr(model, "activation_blocks", None)
    for conv_path, bn_path, act_path in (blocks() if callable(blocks) else []):
        b = model.get_submodule(conv_path)
        bn = model.get_submodule(bn_path) if bn_path else None
        act = model.get_submodule(act_path)
        if (isinstance(b, BinaryBlock) and isinstance(b.conv, PackedBinaryConv) and isinstance(b.bn, nn.Identity)
                and b.conv.input_scaling != "xnor_k" and b.conv.activation == "none"
                and (bn is None or isinstance(bn, nn.Identity))
                and (isinstance(act, RPReLU) or activation_slope(act) is not None)):
            _set(model, conv_path, FusedBinaryBlock(b, act, b.conv.backend))
            _set(model, act_path, nn.Identity())
            count += 1
    return count


def _fuse_activations(model: nn.Module) -> int:
    """Fold the activation after a PackedBinaryConv into its kernel call where the structure is
    certain (the model's `activation_blocks` hook, or ``conv, [Identity], act`` in a plain
    Sequential), and each binary block's shortcut add and activation into one epilogue pass
    (`FusedBinaryBlock`); returns how many were fused."""
    count = _fuse_blocks(model)
    blocks = getattr(model, "activation_blocks", None)
    for conv_path, bn_path, act_path in (blocks() if callable(blocks) else []):
        c = model.get_submodule(conv_path)
        bn = model.get_submodule(bn_path) if bn_path else None
        act_mod = model.get_submodule(act_path)
        act = _act_name(act_mod)
        if (isinstance(c, PackedBinaryConv) and c.input_scaling != "xnor_k" and c.activation == "none"
                and act and (bn is None or isinstance(bn, nn.Identity))):
            c.activation = act
            _set(model, act_path, nn.Identity())
            count += 1
        elif ((kind := StemConv if StemConv.fits(c) else PointwiseConv if PointwiseConv.fits(c) else None)
              and (bn is None or isinstance(bn, nn.Identity)) and (act or isinstance(act_mod, nn.Identity))):
            # a float conv with few input channels (the stem) or a float 1x1 conv: direct kernels
            # vectorised over the output width, activation fused
            backend = next((m.backend for m in model.modules() if isinstance(m, PackedBinaryConv)), None)
            _set(model, conv_path, kind(c, act or "none", backend))
            _set(model, act_path, nn.Identity())
            count += 1 if act else 0
        elif (type(c) is nn.Conv2d and isinstance(act_mod, (nn.ReLU, nn.LeakyReLU))
              and (bn is None or isinstance(bn, nn.Identity))):
            # a float conv (BN folded) whose output only its activation reads: activate in place
            # (no second full-size map to allocate and fault in)
            act_mod.inplace = True
    backend = next((m.backend for m in model.modules() if isinstance(m, PackedBinaryConv)), None)
    for m in list(model.modules()):
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            count += _fuse_sequential(m, backend)
    for path, m in list(model.named_modules()):
        if _plain_pool2(m):  # the pools left (e.g. BinaryDenseNet transitions): the same maxima, faster
            _set(model, path, MaxPool2x2())
    return count


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2, 2)`` (no padding) as two elementwise maxima of strided views
    (`kd_bnn.models.darknet.model.darknet_maxpool` with padding 0: the same maxima, NaN propagated
    alike, several times faster than torch's CPU max_pool2d on large NCHW maps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kd_bnn.models.darknet.model import darknet_maxpool

        return darknet_maxpool(x, 2, 2, 0)


def _fuse_sequential(m: nn.Sequential, backend: str | None) -> int:
    """In a plain Sequential (each child reads only the previous one's output): a binary conv's
    activation (``conv, [Identity], act``) into its kernel call; a float stem conv (`StemConv.fits`,
    BN folded: ``conv, [Identity], act``) onto the stem kernel with its activation, and a 2x2
    stride-2 ``nn.MaxPool2d`` after it (padding 0) into the same kernel call (`StemConv.pool`:
    only the pooled map is written). Structural, so it needs no family hook (the students'
    ``conv -> bn -> act -> pool`` stem; `activation_blocks` would also open the stem to
    `binarize`'s block options). Returns the activations fused."""
    count = 0
    kids = list(m._modules.items())
    for i, (name, c) in enumerate(kids):
        j = i + 1
        if j < len(kids) and isinstance(kids[j][1], nn.Identity):
            j += 1
        act = _act_name(kids[j][1]) if j < len(kids) else None
        if isinstance(c, PackedBinaryConv):
            if act and c.input_scaling != "xnor_k" and c.activation == "none":
                c.activation = act
                m._modules[kids[j][0]] = nn.Identity()
                count += 1
        elif act and StemConv.fits(c):
            c = m._modules[name] = StemConv(c, act, backend)
            m._modules[kids[j][0]] = nn.Identity()
            count += 1
        if isinstance(c, StemConv) and c.pool is None:
            k = i + 1
            while k < len(kids) and isinstance(m._modules[kids[k][0]], nn.Identity):
                k += 1
            if k < len(kids) and _plain_pool2(kids[k][1]):
                c.pool = 0
                m._modules[kids[k][0]] = nn.Identity()
    return count


def _plain_pool2(p: nn.Module) -> bool:
    """``nn.MaxPool2d(2, 2)``, no padding, dilation or ceil mode: the stem kernel's pool with padding 0."""
    return (type(p) is nn.MaxPool2d and p.kernel_size in (2, (2, 2)) and p.stride in (2, (2, 2)) and p.padding in (0, (0, 0))
            and p.dilation in (1, (1, 1)) and not p.ceil_mode and not p.return_indices)


class StemConv(nn.Module):
    """A float conv with few input channels (a detector's first conv, BN folded) and its activation,
    run by the stem kernel (`kd_bnn.deploy.kernels.stem_conv2d`: direct conv vectorised over the
    output width, bias and activation fused); torch's conv is slow at ``C_in = 3``."""

    def __init__(self, conv: nn.Conv2d, activation: str = "none", backend: str | None = None):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.register_buffer("weight", conv.weight.detach().float().clone().contiguous())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone().contiguous())
        self.stride, self.padding = conv.stride[0], conv.padding[0]
        self.activation, self.backend = activation, backend
        #: a 2x2 stride-2 max-pool after the conv fused into every call (its padding, 0 or 1), or None
        self.pool: int | None = None

    @staticmethod
    def fits(c: nn.Module) -> bool:
        """Whether ``c`` is a plain ``nn.Conv2d`` the stem kernel runs: groups 1, no dilation,
        ``in_channels <= 8``, kernel <= 7, equal strides 1 or 2, symmetric zero padding."""
        return (type(c) is nn.Conv2d and c.groups == 1 and tuple(c.dilation) == (1, 1) and c.in_channels <= 8
                and max(c.kernel_size) <= 7 and c.padding_mode == "zeros" and not isinstance(c.padding, str)
                and c.padding[0] == c.padding[1] and c.stride[0] == c.stride[1] and c.stride[0] in (1, 2))

    def forward(self, x: torch.Tensor, pool: int | None = None) -> torch.Tensor:
        """The conv and its activation; ``pool`` 0 or 1 (default: ``self.pool``): then Darknet's 2x2
        stride-2 max-pool with that padding, fused into the kernel call (only the pooled map is written)."""
        return stem_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.activation,
                           backend=self.backend, pool=self.pool if pool is None else pool)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, activation={self.activation}"
                + ("" if self.pool is None else f", pool=2x2 stride 2 padding {self.pool}"))


class PointwiseConv(nn.Module):
    """A float 1x1 conv (stride 1, no padding, BN folded) and its activation, run by
    `kd_bnn.deploy.kernels.pointwise_conv2d` (the stem row kernels over the flattened plane, about
    2x torch's GEMM at one thread); the blocked weights are made once per ISA path."""

    def __init__(self, conv: nn.Conv2d, activation: str = "none", backend: str | None = None):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("weight", conv.weight.detach().float().clone().contiguous())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone().contiguous())
        self.activation, self.backend = activation, backend
        self._blocked: dict[str, torch.Tensor | None] = {}

    @staticmethod
    def fits(c: nn.Module) -> bool:
        """Whether ``c`` is a plain 1x1 ``nn.Conv2d``: groups 1, stride 1, no padding, no dilation."""
        return (type(c) is nn.Conv2d and c.groups == 1 and tuple(c.kernel_size) == (1, 1)
                and tuple(c.stride) == (1, 1) and tuple(c.dilation) == (1, 1) and not isinstance(c.padding, str)
                and tuple(c.padding) == (0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocked = None
        if self.backend != "torch" and x.dtype.is_floating_point:
            isa = default_isa()
            if isa not in self._blocked:
                self._blocked[isa] = pointwise_weights(self.weight, isa)
            blocked = self._blocked[isa]
        return pointwise_conv2d(x, self.weight, self.bias, self.activation, blocked=blocked, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), activation={self.activation}"


class PackedOps:
    """The packed kernels as the `Detector.packed_forward` hook sees them
    (`kd_bnn.models.detector.PackedOps`): packed tensors are int64 sign words (N, H, W, words)."""

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def is_packed_conv(self, conv: nn.Module) -> bool:
        return isinstance(conv, PackedBinaryConv)

    def chainable_xnor(self, conv: nn.Module) -> bool:
        return (isinstance(conv, PackedBinaryConv) and conv.mode == "xnor" and conv.input_scaling != "xnor_k"
                and conv._kernel_ok and conv._sym)

    def is_packed(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.int64

    def can_stem_pool(self, conv: nn.Module) -> bool:
        """Whether ``conv`` runs on the stem kernel, which can fuse a following 2x2 max-pool."""
        return isinstance(conv, StemConv)

    def stem_pool(self, conv: nn.Module, x: torch.Tensor, padding: int) -> torch.Tensor:
        """``conv`` (a `StemConv`, activation fused) then Darknet's size-2 stride-2 max-pool with
        ``padding`` 0 or 1, in one kernel call writing only the pooled map (exact)."""
        return conv(x, pool=padding)

    #: conv output bytes above which `conv_pool` runs in row bands, and the bytes of one band
    band_min_bytes, band_bytes = 8 << 20, 4 << 20

    def can_conv_pool(self, conv: nn.Module) -> bool:
        """Whether a block around ``conv`` may run in row bands (`conv_pool`): a float-output conv
        the runtime holds, stride 1, no dilation, ``same`` padding (odd square kernel, pad k // 2),
        so every output row depends only on the input rows around it."""
        if isinstance(conv, PackedBinaryConv):
            k, pad = conv.kernel_size, conv.pad
            return (conv.stride == (1, 1) and conv.dilation == (1, 1) and k[0] == k[1] and k[0] % 2 == 1
                    and len(set(pad)) == 1 and pad[0] == k[0] // 2)
        if isinstance(conv, PointwiseConv):
            return True
        return (type(conv) is nn.Conv2d and conv.groups == 1 and tuple(conv.stride) == (1, 1)
                and tuple(conv.dilation) == (1, 1) and not isinstance(conv.padding, str)
                and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
                and tuple(conv.padding) == (conv.kernel_size[0] // 2,) * 2)

    def conv_pool(self, block: nn.Module, conv: nn.Module, x: torch.Tensor, padding: int) -> torch.Tensor:
        """``block(x)`` (``conv`` then elementwise layers, `can_conv_pool`) followed by Darknet's
        2x2 stride-2 max-pool with ``padding`` 0 or 1, computed in bands of output rows so that the
        full-resolution map never exists: only one band (~``band_bytes``) and the pooled map do.
        Exactly the unbanded result: a band's conv reads its input rows plus ``k // 2`` halo rows
        on each side (the conv's own zero padding where the band meets the image border)."""
        from kd_bnn.models.darknet.model import darknet_maxpool

        n, _, h, w = x.shape
        c_out = conv.out_channels
        if n * c_out * h * w * 4 <= self.band_min_bytes or h < 4:
            return darknet_maxpool(block(x), 2, 2, padding)
        k = conv.kernel_size[0] if isinstance(conv, (PackedBinaryConv, nn.Conv2d)) else 1
        halo = k // 2
        rows = max(2, self.band_bytes // (n * c_out * w * 4) // 2 * 2)
        oh, ow = (h + padding - 2) // 2 + 1, (w + padding - 2) // 2 + 1
        out = None
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a, b = max(0, r0 - halo), min(h, r1 + halo)
            y = block(x[:, :, a:b])[:, :, r0 - a:r1 - a]
            # bands start at even rows and all but the last have an even height: the pool's
            # windows overhang (padding 1, odd size) only at the image's bottom and right edges
            pooled = darknet_maxpool(y, 2, 2, padding)
            if out is None:
                out = torch.empty(n, pooled.shape[1], oh, ow, dtype=pooled.dtype)
            out[:, :, r0 // 2:r0 // 2 + pooled.shape[2]] = pooled
        return out

    def w1a8_scale(self, conv: nn.Module) -> float | None:
        """The 8-bit input scale of a W1A8 conv (`kd_bnn.deploy.quantize`), None for other convs."""
        return conv.act_scale if isinstance(conv, PackedBinaryConv) else None

    def w1a8(self, conv: nn.Module, x: torch.Tensor, out_scale: float | None) -> torch.Tensor:
        """W1A8 ``conv`` (activation fused) on float or int8 ``x``; int8 output in ``out_scale``
        (the next W1A8 conv's input scale) when given, else float."""
        return conv.w1a8(x, None if out_scale is None else inverse_scale(out_scale))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        from kd_bnn.deploy.kernels import pack_input

        return pack_input(x, 0, -1.0, backend=self.backend)

    def xnor(self, conv: nn.Module, x: torch.Tensor, packed_out: bool) -> torch.Tensor:
        kh, kw = conv.kernel_size
        return xnor_conv2d(x, conv.words, conv.in_channels, (kh, kw), conv.stride[0], conv.pad[0], conv.pad_value,
                           scale=conv.scale, bias=conv.shift, activation=conv.activation,
                           output="packed" if packed_out else "float", panel=conv.panel, backend=conv.backend)

    def xnor_fused(self, conv: nn.Module, x: torch.Tensor, *, residual: torch.Tensor | None = None,
                   packed_for: nn.Module | None = None, bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                   float_out: bool = True, x_padded: bool = False, table: OutputMap | None = None):
        """``conv`` (a `chainable_xnor` conv) on ``x``: float NCHW, or packed words (``x_padded``:
        already padded for ``conv``). Float output ``act(conv) + residual``; with ``packed_for``
        also packed words from the same kernel pass, padded for that conv (None: unpadded): the
        signs of the float output, or with ``bounds`` (`sign_bounds`) bits of a monotone function
        of it. ``table`` (`output_table`): the float output is a per-channel function of the conv
        output (e.g. a BatchNorm after it: a fused multiply-add where exact, else looked up by
        popcount), then the residual. Returns the float map, the
        packed words (``float_out=False``, bounds only), or both."""
        kh, kw = conv.kernel_size
        want_packed = packed_for is not None or bounds is not None
        output = ("both" if float_out else "packed") if want_packed else "float"
        pad_for = packed_for if isinstance(packed_for, PackedBinaryConv) else None
        return xnor_conv2d(x, conv.words, conv.in_channels, (kh, kw), conv.stride[0], conv.pad[0], conv.pad_value,
                           scale=conv.scale, bias=conv.shift, activation=conv.activation, output=output,
                           out_padding=pad_for.pad[0] if pad_for is not None else 0,
                           out_pad_value=pad_for.pad_value if pad_for is not None else -1.0,
                           x_is_padded=x_padded and self.is_packed(x), residual=residual, packed_bounds=bounds,
                           table=None if table is None else table.table,
                           affine=None if table is None else (table.a, table.b), panel=conv.panel,
                           backend=conv.backend)

    def output_table(self, conv: nn.Module, fn) -> OutputMap:
        """`xnor_fused`'s ``table`` of ``fn`` (a per-channel elementwise module or function, e.g. a
        BatchNorm in eval mode) after ``conv``: ``fn`` evaluated on every value the conv's float
        output can take, kept as a per-channel fused multiply-add where that equals it on all of
        them, as table rows elsewhere (exact either way: `kd_bnn.deploy.kernels.output_affine`)."""
        return output_affine(conv.in_channels, conv.kernel_size, conv.scale, conv.shift, conv.activation, fn,
                             conv.out_channels)

    def sign_bounds(self, conv: nn.Module, predicate) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Popcount bounds of ``conv`` for `xnor_fused`'s ``bounds``: bit ``c`` = ``predicate(v)[c]``
        for the conv's float output ``v``, evaluated on every value ``v`` can take (exact; None
        when ``predicate`` is not monotone in the output)."""
        return popcount_bounds(conv.in_channels, conv.kernel_size, conv.scale, conv.shift, conv.activation,
                               predicate, conv.out_channels)

    def sign_thresholds(self, predicate, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel thresholds ``(thr, le)`` for a float part of `concat_packed`: bit =
        ``predicate(x)`` (e.g. ``bn(x) >= 0``) as ``x >= thr`` or, where ``le``, ``x <= thr``, for every
        float ``x`` (`kd_bnn.deploy.kernels.sign_thresholds`; None when no threshold fits)."""
        return sign_thresholds(predicate, channels)

    def concat_packed(self, parts: list[tuple[torch.Tensor, int]], pad_for: nn.Module | None = None) -> torch.Tensor:
        """Packed words of the channel concatenation of ``parts`` ``(t, channels[, thresholds])``
        (``t`` unpadded packed words, or a float map binarized on the way: ``x >= 0``, or against
        `sign_thresholds`), padded for conv ``pad_for``
        (None: unpadded), in one C++ pass (`kd_bnn.deploy.kernels.concat_packed`: parts starting on
        a word boundary are copied, others shifted into place)."""
        if pad_for is None:
            return concat_packed(parts, 0, -1.0, backend=self.backend)
        return concat_packed(parts, pad_for.pad[0], pad_for.pad_value, backend=self.backend)


class Runtime:
    """A loaded ``.kdbnn`` model: ``Runtime(path)(images) -> raw``, ``.predict(images)``.

    Args:
        path: the ``.kdbnn`` file.
        fuse: fuse activations into the binary kernels (see the module docstring).
        packed_chains: keep consecutive XNOR layers (and what passes signs between them) in
            packed bits instead of float maps, where the family has a packed graph walk
            (`Detector.packed_plan`; Darknet: :mod:`kd_bnn.models.darknet.packed`; Bi-Real-YOLO and
            BinaryDenseNet-YOLO: :mod:`kd_bnn.models.binary_students_packed`).
        backend: ``None``/``"auto"`` (C++ kernels when available), ``"torch"`` (pure-torch path).
        threads: set ``torch.set_num_threads`` (kernels use torch's intra-op pool) when given.
    """

    def __init__(self, path: str | os.PathLike, fuse: bool = True, backend: str | None = None,
                 threads: int | None = None, packed_chains: bool = True):
        self.path = Path(path)
        if threads is not None:
            torch.set_num_threads(int(threads))
        tensors, meta = load_container(self.path)
        if meta.get("kind") != "kdbnn-model" or "layers" not in meta:
            raise FormatError(f"{self.path}: not an exported model (metadata 'kind' is "
                              f"{meta.get('kind')!r}, expected 'kdbnn-model' with a layer table)")
        self.meta = meta
        self.class_names: list[str] = list(meta.get("class_names") or [])
        self.input_size: tuple[int, int] = tuple(int(v) for v in meta["input_size"])
        self.anchors = meta.get("anchors")
        try:
            skeleton = build_skeleton(meta, initialize=False)
        except FormatError as exc:
            raise FormatError(f"{self.path}: {exc}") from exc
        self.model = self._assemble(skeleton, tensors, meta, backend)
        self.fused = _fuse_activations(self.model) if fuse else 0
        self.model.eval()
        self.backend = backend
        self.ops = PackedOps(backend)
        plan_fn = getattr(self.model, "packed_plan", None)
        self.packed_plan = plan_fn(self.ops) if (packed_chains and callable(plan_fn)) else None

    def _assemble(self, model: nn.Module, blobs: dict[str, torch.Tensor], meta: dict[str, Any],
                  backend: str | None) -> nn.Module:
        """Fill the rebuilt tree: packed binary convs, BN-folded float convs, everything else by
        state-dict name, each tensor cut from the blobs by the shared layout plan."""
        layers = meta["layers"]
        binary = meta.get("binary") or {}
        try:
            slots, totals = tensor_plan(model, layers)
            values = split_blobs(blobs, slots, totals)
            specs = {e["path"]: binary_conv_spec(e["path"], model.get_submodule(e["path"]),
                                                 binary_options(e, binary))
                     for e in layers if e["kind"] == "binary_conv"}
            act_scales = check_activations(meta)
        except FormatError as exc:
            raise FormatError(f"{self.path}: {exc}") from exc
        modules = dict(model.named_modules())
        for e in layers:
            path, kind = e["path"], e["kind"]
            got = values.get(path, {})
            if kind == "binary_conv":
                extra = sorted(set(got) - {"words", "alpha", "bn_scale", "bn_shift", "bias"})
                if extra:
                    raise FormatError(f"{self.path}: binary layer '{path}' has extra tensors {extra} "
                                      "this runtime cannot use")
                bn_scale = got.get("bn_scale")
                shift = got.get("bn_shift") if bn_scale is not None else got.get("bias")
                try:
                    conv = PackedBinaryConv(specs[path], got["words"], got["alpha"], bn_scale, shift, backend,
                                            act_scale=act_scales.get(path))
                except FormatError as exc:
                    raise FormatError(f"{self.path}: {exc}") from None
                _set(model, path, conv)
            else:
                m = modules[path]
                if kind == "float_conv" and "bias" in got and m.bias is None:
                    new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                    m.dilation, m.groups, bias=True, padding_mode=m.padding_mode)
                    _set(model, path, new)
                    m = new
                own = dict(m.named_parameters(recurse=False))
                own.update(dict(m.named_buffers(recurse=False)))
                with torch.no_grad():
                    for role, t in got.items():
                        own[role].copy_(t.to(own[role].dtype))
            if e.get("bn"):
                _set(model, e["bn"], nn.Identity())
        return model

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        """Raw head maps of a batch ``(B, 3, H, W)`` in [0, 1] (as the student's forward)."""
        if self.packed_plan is not None:
            return self.model.packed_forward(images.float(), self.packed_plan, self.ops)
        return self.model(images.float())

    @torch.no_grad()
    def predict(self, images: torch.Tensor | None = None, conf_thres: float = 0.005, iou_thres: float = 0.45,
                max_det: int = 300, raw=None):
        """Detections (input pixels) of ``images``, or of ``raw`` maps, via the skeleton's predict."""
        if raw is None:
            if images is None:
                raise ValueError("predict needs images or raw maps")
            raw = self(images)
        return self.model.predict(raw, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def resident_weight_bytes(self) -> int:
        """Bytes of the tensors the runtime model holds (packed words, floats, buffers)."""
        seen, n = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:  # views (e.g. words of the XNOR panel) count once
                seen.add(st.data_ptr())
                n += st.nbytes()
        return n

    def __repr__(self) -> str:
        return (f"Runtime({self.path.name}, {type(self.model).__name__}, input {self.input_size}, "
                f"classes {self.class_names}, fused {self.fused})")


# ----------------------------------------------------------------------------- folders of images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
def draw_detections(image_rgb, boxes, scores, labels, class_names) -> Any:
    """A BGR copy of an RGB image with boxes and ``class score`` captions drawn (cv2), one colour per
    class (:data:`kd_bnn.eval.report.CLASS_COLOURS`, as the training run's validation grid)."""
    import cv2

    from kd_bnn.eval.report import class_colour

    out = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    for (x1, y1, x2, y2), s, c in zip(boxes, scores, labels):
        col = class_colour(int(c))[::-1]  # RGB -> BGR
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, col, 2)
        name = class_names[int(c)] if int(c) < len(class_names) else str(int(c))
        cv2.putText(out, f"{name} {float(s):.2f}", (p1[0], max(p1[1] - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, col, 1, cv2.LINE_AA)
    return out


def predict_images(model: Any, files: list[Path], out: str | Path, conf_thres: float = 0.3,
                   iou_thres: float = 0.45, max_det: int = 300, draw: bool = True,
                   progress: bool = False) -> dict[str, Any]:
    """Detect objects in each image file: KITTI result files in ``out/data/<stem>.txt`` (boxes in
    original pixels, letterbox inverted) and drawn images in ``out/images/``. `model`: a `Runtime`
    or anything with ``predict(images, conf_thres, iou_thres, max_det)``, ``input_size``,
    ``class_names`` (``kd-bnn predict`` wraps a checkpoint's torch model so)."""
    import cv2
    from tqdm.auto import tqdm

    from kd_bnn.data.transforms import letterbox_to_original, read_letterboxed
    from kd_bnn.eval.kitti import write_kitti_results

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    if draw:
        (out / "images").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for path in tqdm(files, desc="predict", disable=not progress, leave=False):
        rgb, x, geometry = read_letterboxed(path, model.input_size)
        det = model.predict(x[None], conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)[0]
        boxes = letterbox_to_original(det.boxes.detach().cpu().double().numpy(), geometry)
        scores = det.scores.detach().cpu().numpy()
        labels = det.labels.detach().cpu().numpy()
        write_kitti_results(out / "data", path.stem, boxes, scores, labels, model.class_names)
        if draw:
            cv2.imwrite(str(out / "images" / f"{path.stem}.png"),
                        draw_detections(rgb, boxes, scores, labels, model.class_names))
        counts[path.stem] = int(len(scores))
    return {"images": len(files), "detections": counts, "out": str(out)}
