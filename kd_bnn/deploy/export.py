"""Export a binary student to a bit-packed ``.kdbnn`` file (and a float-equivalent ONNX graph).

What the file holds (container: :mod:`kd_bnn.deploy.format`, a checksummed safetensors file):

* metadata ``meta`` (JSON): ``kind: "kdbnn-model"``, class names, input size ``[H, W]``, anchors
  (pixels, per head, informational), ``skeleton`` - what rebuilds the float module tree
  (``{"family": "darknet", "cfg_text": ...}`` or ``{"family": F, "options": {...}}`` for
  ``binary_densenet`` / ``bireal`` / ``mobilenet_yolo`` ...), ``binary`` - the binary options of
  the student (mode, pad_value, weight/input scaling per layer live in the layer table), and
  ``layers``: one entry per module holding tensors, in ``named_modules`` order::

      {"path": "layers.2.conv", "kind": "binary_conv" | "float_conv" | "bn" | "other",
       "type": "BinaryConv2d", "tensors": {role: stored tensor name}, ...geometry...}

* tensors, named ``<module path>.<role>``:

  - ``binary_conv``: ``words`` int64 ``pack_signs(W)`` (C_out, KH*KW, ceil(C_in/64)) - see
    :mod:`kd_bnn.deploy.pack`; ``alpha`` float32 (C_out,) (``BinaryConv2d.weight_scale()``);
    with a folded BatchNorm ``bn_scale`` / ``bn_shift`` float32 (C_out,) such that
    ``BN(conv + b) = conv*bn_scale + bn_shift`` (the conv bias is folded into the shift),
    otherwise ``bias`` if the conv has one;
  - ``float_conv``: ``weight`` float32 (BN folded in: ``W*s``) and ``bias`` (``b*s + t`` when
    folded; the conv's own bias otherwise, if any);
  - ``bn`` folded into a conv: no tensors (``folded_into`` names the conv); an unfolded BN is
    stored like ``other``;
  - ``other``: each own parameter / persistent buffer (except ``num_batches_tracked``) under its
    state-dict name, float32 (integer buffers as int32: 4 bytes an element either way).

``meta_checksum`` (sha256 of the metadata JSON without that key) makes an edited layer table
detectable; the container's own checksum covers the tensors.

Which BN is folded, and so the exact byte count, is :func:`kd_bnn.binary.summary.conv_bn_pairs`;
the tensor bytes equal :func:`kd_bnn.binary.summary.packed_model_bytes` exactly, and the file
adds only the safetensors header with this metadata: about 12 KB for the demo student (8% of
its 148 KB of tensors: layer table 5.8 KB, per-tensor safetensors entries 3.4 KB, cfg text
1.6 KB) and 28 KB for DarkNet-19 YOLOv2 KITTI (0.4% of 6.6 MB).
BN folding: ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (Ioffe & Szegedy 2015).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.binary.summary import conv_bn_pairs, float32_model_bytes, packed_model_bytes
from kd_bnn.deploy.format import FORMAT_VERSION, save_container
from kd_bnn.deploy.pack import pack_signs

__all__ = [
    "ExportError",
    "skeleton_of",
    "bn_affine",
    "build_payload",
    "export",
    "export_checkpoint",
    "export_onnx",
    "float_equivalent",
    "meta_checksum",
]

META_KIND = "kdbnn-model"
_SKIP = ("num_batches_tracked",)


class ExportError(ValueError):
    """The model cannot be exported (unknown skeleton, unsupported layer, ...)."""


# ----------------------------------------------------------------------------- helpers


def skeleton_of(model: nn.Module, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What rebuilds the model's float module tree: Darknet cfg text, or family + options.

    A Darknet model carries its cfg; other families must be described by
    ``extra_meta["skeleton"] = {"family": ..., "options": {...}}`` (``export_checkpoint`` fills
    it from the config).
    """
    if extra_meta and extra_meta.get("skeleton"):
        sk = dict(extra_meta["skeleton"])
        if "family" not in sk:
            raise ExportError(f"extra_meta['skeleton'] needs a 'family' key, found {sorted(sk)}")
        sk.setdefault("options", {})
        return sk
    from kd_bnn.models.darknet.model import DarknetDetector

    if isinstance(model, DarknetDetector):
        return {"family": "darknet", "cfg_text": model.cfg_text(), "options": {}}
    raise ExportError(
        f"cannot tell how to rebuild a {type(model).__name__}: pass "
        "extra_meta={'skeleton': {'family': <registered family>, 'options': {...}}} "
        "(kd_bnn.deploy.export_checkpoint fills it from the experiment config)"
    )


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x*s + t`` (float64 math, float32 result)."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def _own_tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(k, v) for k, v in m._parameters.items() if v is not None]
    out += [(k, v) for k, v in m._buffers.items()
            if v is not None and k not in m._non_persistent_buffers_set and k not in _SKIP]
    return out


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.float().contiguous()
    return t.to(torch.int32).contiguous()


def _anchors(model: nn.Module) -> list[list[list[float]]]:
    out = []
    for m in model.modules():
        a = getattr(m, "anchors_px", None)
        if isinstance(a, torch.Tensor):
            out.append(a.detach().cpu().double().reshape(-1, 2).tolist())
    return out


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def _conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    from kd_bnn.binary.layers import conv_explicit_padding

    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
        "padding": list(conv_explicit_padding(conv)), "dilation": list(conv.dilation),
        "groups": conv.groups, "padding_mode": conv.padding_mode,
    }


# ----------------------------------------------------------------------------- export


@torch.no_grad()
def build_payload(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The tensors and the layer table of a model (see the module docstring)."""
    pairs = conv_bn_pairs(model)
    folded = {bn: conv for conv, bn in pairs.items()}
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    seen: set[int] = set()
    disabled = []
    for path, m in model.named_modules():
        own = []
        for k, t in _own_tensors(m):
            if id(t) not in seen:
                seen.add(id(t))
                own.append((k, t))
        p = _prefix(path)
        if isinstance(m, nn.Conv2d) and any(k == "weight" for k, _ in own):
            bn = modules[pairs[path]] if path in pairs else None
            entry: dict[str, Any] = {"path": path, "type": type(m).__name__, "bn": pairs.get(path),
                                     "has_bias": m.bias is not None, **_conv_geometry(m)}
            names: dict[str, str] = {}
            bias = m.bias.detach().double() if m.bias is not None else None
            if isinstance(m, BinaryConv2d):
                if m.groups != 1:
                    raise ExportError(f"{path}: binary conv with groups={m.groups} cannot be packed")
                if not m.enabled:
                    disabled.append(path)
                entry.update(kind="binary_conv", mode=m.mode, pad_value=m.pad_value,
                             weight_scaling=m.weight_scaling, input_scaling=m.input_scaling)
                names["words"] = p + "words"
                tensors[names["words"]] = pack_signs(m.weight.detach().cpu())
                names["alpha"] = p + "alpha"
                tensors[names["alpha"]] = m.weight_scale().detach().cpu().float()
                if bn is not None:
                    s, t = bn_affine(bn)
                    if bias is not None:
                        t = t + bias * s
                    names["bn_scale"], names["bn_shift"] = p + "bn_scale", p + "bn_shift"
                    tensors[names["bn_scale"]] = s.float()
                    tensors[names["bn_shift"]] = t.float()
                elif bias is not None:
                    names["bias"] = p + "bias"
                    tensors[names["bias"]] = bias.float()
                layer_keys = {"weight", "bias", "scale"}
            else:
                entry["kind"] = "float_conv"
                w = m.weight.detach().double()
                if bn is not None:
                    s, t = bn_affine(bn)
                    w = w * s.view(-1, *([1] * (w.dim() - 1)))
                    bias = t + (bias * s if bias is not None else 0.0)
                names["weight"] = p + "weight"
                tensors[names["weight"]] = w.float().cpu().contiguous()
                if bias is not None:
                    names["bias"] = p + "bias"
                    tensors[names["bias"]] = bias.float().cpu()
                layer_keys = {"weight", "bias"}
            for k, t in own:  # anything else the conv owns (summary counts it as float32)
                if k not in layer_keys:
                    names[k] = p + k
                    tensors[names[k]] = _as_stored(t)
            entry["tensors"] = names
            layers.append(entry)
        elif path in folded:
            layers.append({"path": path, "kind": "bn", "type": type(m).__name__,
                           "folded_into": folded[path], "tensors": {}})
        elif own:
            kind = "bn" if isinstance(m, nn.modules.batchnorm._BatchNorm) else "other"
            names = {}
            for k, t in own:
                names[k] = p + k
                tensors[names[k]] = _as_stored(t)
            layers.append({"path": path, "kind": kind, "type": type(m).__name__,
                           "folded_into": None, "tensors": names})
    if disabled:
        warnings.warn(f"{len(disabled)} binary conv(s) are disabled (their binarization stage has "
                      f"not started), e.g. {disabled[:3]}; they are exported binary anyway",
                      RuntimeWarning, stacklevel=3)
    return tensors, layers


def export(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int] | None = None,
           extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (a binary student, or any Detector) as a ``.kdbnn`` file.

    Args:
        model: the student (eval-mode maps are what the file reproduces).
        path: output file (written atomically).
        input_size: (H, W); default ``model.input_size``.
        extra_meta: merged into the metadata; ``extra_meta["skeleton"]`` describes how to rebuild
            a non-Darknet model (see :func:`skeleton_of`).

    Returns:
        a report: ``file_bytes``, ``tensor_bytes``, ``float32_bytes``, ``predicted_packed_bytes``,
        ``header_bytes``, ``compression`` (float32 / file), ``size_vs_prediction`` (file / predicted),
        counts of binary / float convs.
    """
    extra = dict(extra_meta or {})
    skeleton = skeleton_of(model, extra)
    extra.pop("skeleton", None)
    size = tuple(int(v) for v in (input_size or model.input_size))
    tensors, layers = build_payload(model)
    binary = [e for e in layers if e["kind"] == "binary_conv"]
    meta = {
        "kind": META_KIND,
        "format_version": FORMAT_VERSION,
        "class_names": [str(c) for c in getattr(model, "class_names", [])],
        "input_size": list(size),
        "anchors": _anchors(model),
        "skeleton": skeleton,
        "binary": {
            "modes": sorted({e["mode"] for e in binary}),
            "pad_values": sorted({e["pad_value"] for e in binary}),
            "weight_scalings": sorted({e["weight_scaling"] for e in binary}),
            "input_scalings": sorted({e["input_scaling"] for e in binary}),
            "num_binary_convs": len(binary),
        },
        "layers": layers,
        **extra,
    }
    meta["meta_checksum"] = meta_checksum(meta)
    file_bytes = save_container(path, tensors, meta)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    predicted = packed_model_bytes(model)
    f32 = float32_model_bytes(model)
    return {
        "path": str(path),
        "file_bytes": file_bytes,
        "tensor_bytes": tensor_bytes,
        "header_bytes": file_bytes - tensor_bytes,
        "float32_bytes": f32,
        "predicted_packed_bytes": predicted,
        "compression": f32 / file_bytes,
        "predicted_compression": f32 / predicted if predicted else math.nan,
        "size_vs_prediction": file_bytes / predicted if predicted else math.nan,
        "num_binary_convs": len(binary),
        "num_float_convs": sum(1 for e in layers if e["kind"] == "float_conv"),
        "input_size": list(size),
    }


def meta_checksum(meta: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the metadata JSON without its own ``meta_checksum`` key.

    The container's checksum covers the tensors only; this one makes an edited layer table,
    skeleton or class list detectable too.
    """
    import hashlib
    import json

    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _skeleton_from_config(cfg: Any) -> dict[str, Any]:
    mcfg = cfg.student.model if (cfg.student is not None and cfg.student.model is not None) else cfg.teacher
    if mcfg.family == "darknet":
        return {}  # the model carries its cfg text
    # weight paths (e.g. mobilenet_yolo's backbone_weights) are not needed to rebuild the
    # skeleton: the file holds every tensor, and the path may not exist where it is deployed
    opts = {k: v for k, v in dict(mcfg.options).items() if not k.endswith("weights")}
    return {"family": mcfg.family, "options": opts}


def export_checkpoint(config: str | os.PathLike | Any, checkpoint: str | os.PathLike | None,
                      out: str | os.PathLike, overrides: list[str] | None = None,
                      onnx: str | os.PathLike | None = None) -> dict[str, Any]:
    """Rebuild the student of an experiment config (from ``checkpoint``, or randomly initialised
    when None, to size an architecture before training) and export it to ``out``.

    Returns the :func:`export` report plus ``config``, ``checkpoint`` and (with ``onnx``) the
    ONNX result.
    """
    from kd_bnn.config import ExperimentConfig, load_config

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides or [])
    if checkpoint is None:
        from kd_bnn.binary.convert import apply_stages
        from kd_bnn.engine.experiment import build_model, build_student

        teacher = build_model(cfg.teacher, cfg.data.classes, cfg.data.input_size, load_weights=False)
        if cfg.student is None:
            model = teacher
        else:
            model, _ = build_student(teacher, cfg)
            apply_stages(model, cfg.student.binary, 10**9)
    else:
        from kd_bnn.engine.experiment import load_student

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        model = load_student(cfg, checkpoint)
    model.eval()
    sk = _skeleton_from_config(cfg)
    extra: dict[str, Any] = {"source": {"config": str(config) if not isinstance(config, ExperimentConfig)
                                        else cfg.name, "checkpoint": None if checkpoint is None else str(checkpoint)}}
    if sk:
        extra["skeleton"] = sk
    report = export(model, out, tuple(cfg.data.input_size), extra)
    report["config"] = extra["source"]["config"]
    report["checkpoint"] = extra["source"]["checkpoint"]
    if onnx is not None:
        report["onnx"] = export_onnx(model, onnx, tuple(cfg.data.input_size))
    return report


# ----------------------------------------------------------------------------- ONNX


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
