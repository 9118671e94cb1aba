"""A float-equivalent ONNX graph of a binary student (sign activations and ``alpha*sign(W)``
weights as ordinary float ops), for runtimes without the packed kernels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d

__all__ = ["SignActivation", "export_onnx", "float_equivalent"]


class SignActivation(nn.Module):
    """``x >= 0 -> +1 else -1`` (the deterministic sign of XNOR inputs), ONNX-exportable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _XnorEquivalent(nn.Module):
    """sign(x) -> pad with the binary pad value -> conv with ±alpha weights [* K] (+ bias)."""

    def __init__(self, m: BinaryConv2d):
        super().__init__()
        self.sign = SignActivation()
        self.pad = tuple(m.explicit_padding())
        self.pad_value = float(m.pad_value)
        self.input_scaling = m.input_scaling
        self.kernel_size, self.stride, self.dilation = m.kernel_size, m.stride, m.dilation
        self.conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation,
                              m.groups, bias=False)
        self.conv.weight.data.copy_(m.binary_weight())
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        xb = self.sign(x)
        if any(self.pad):
            xb = F.pad(xb, self.pad, value=self.pad_value)
        y = self.conv(xb)
        if self.input_scaling == "xnor_k":
            from kd_bnn.binary.quantizers import xnor_k

            y = y * xnor_k(x, self.kernel_size, self.stride, self.pad, self.dilation)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def float_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BinaryConv2d replaced by plain float ops computing the same
    eval-mode function: ``nn.Conv2d`` with ``binary_weight()`` (±alpha) for BWN layers, and sign
    activation + pad + that conv for XNOR layers."""
    import copy

    model = copy.deepcopy(model).eval()
    for path, m in list(model.named_modules()):
        if not isinstance(m, BinaryConv2d):
            continue
        if m.mode == "xnor":
            new: nn.Module = _XnorEquivalent(m)
        else:
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
            new.weight.data.copy_(m.binary_weight())
            if m.bias is not None:
                new.bias.data.copy_(m.bias.detach())
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)
    return model


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int],
                opset: int = 17) -> dict[str, Any]:
    """Write the float-equivalent graph (binary weights as ±alpha floats) as ONNX.

    Uses the TorchScript-based exporter (``dynamo=False``), which works offline on CPU. Returns
    ``{"path", "bytes", "outputs"}``, or ``{"skipped": reason}`` when torch cannot export.
    """
    import importlib.util
    import warnings as _w

    if importlib.util.find_spec("onnx") is None:
        return {"skipped": "the 'onnx' package is not installed in this environment "
                           "(torch.onnx.export needs it; pip install onnx to enable --onnx)"}
    feq = float_equivalent(model)
    x = torch.zeros(1, 3, *input_size)
    with torch.no_grad():
        raw = feq(x)
    n_out = len(raw) if isinstance(raw, (list, tuple)) else 1
    names = [f"raw{i}" for i in range(n_out)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    try:
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            torch.onnx.export(feq, (x,), str(tmp), input_names=["images"], output_names=names,
                              opset_version=opset, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - report why, do not crash the .kdbnn export
        tmp.unlink(missing_ok=True)
        return {"skipped": f"torch.onnx.export failed ({type(exc).__name__}: {str(exc)[:300]})"}
    os.replace(tmp, path)
    return {"path": str(path), "bytes": Path(path).stat().st_size, "outputs": names}
