"""Export a binary student to a bit-packed ``.kdbnn`` file.

The file holds every binary conv's packed signs and per-channel scale (BatchNorm folded in), the
float tensors, and a metadata document whose skeleton rebuilds the module tree from plain data
(`Detector.skeleton`). Layout and roles: :mod:`kd_bnn.deploy.schema` and docs/architecture.md,
"The .kdbnn file". The blob bytes equal :func:`kd_bnn.binary.summary.packed_model_bytes`
exactly; the file adds only the container header and the compressed metadata.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.blocks import block_specs_of
from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.binary.summary import conv_bn_pairs, float32_model_bytes, packed_model_bytes, summary
from kd_bnn.deploy.format import MIN_FORMAT_VERSION, FormatError, encode_meta, save_container
from kd_bnn.deploy.pack import pack_signs
from kd_bnn.deploy.quantize import ACT_BITS, w1a8_reason
from kd_bnn.deploy.schema import (
    BINARY_OPTIONS,
    BLOB_DTYPES,
    CONV_KINDS,
    META_KIND,
    Slot,
    bn_affine,
    build_skeleton,
    is_stored_conv,
    owned_tensors,
    stored_tensor,
    tensor_plan,
)
from kd_bnn.models.detector import SkeletonError, check_skeleton

__all__ = ["ExportError", "build_payload", "export", "layer_table", "skeleton_of"]


class ExportError(ValueError):
    """The model cannot be exported (unknown skeleton, unsupported layer, ...)."""


# ----------------------------------------------------------------------------- helpers


def skeleton_of(model: nn.Module, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """What rebuilds the model's float module tree, as plain data: the `Detector.skeleton` hook
    (a Darknet model's cfg text, or a family and its options), or ``extra_meta["skeleton"] =
    {"family": ..., "options": {...}}``; options must fit the family's skeleton schema
    (:func:`kd_bnn.models.detector.check_skeleton`: plain values only, no file paths, no ``trust``).
    """
    if extra_meta and extra_meta.get("skeleton"):
        sk = dict(extra_meta["skeleton"])
        if "family" not in sk:
            raise ExportError(f"extra_meta['skeleton'] needs a 'family' key, found {sorted(sk)}")
    else:
        fn = getattr(model, "skeleton", None)
        if not callable(fn):
            raise ExportError(
                f"cannot tell how to rebuild a {type(model).__name__}: it is not a kd_bnn Detector; pass "
                "extra_meta={'skeleton': {'family': <registered family>, 'options': {...}}}")
        try:
            sk = fn()
        except NotImplementedError as exc:
            raise ExportError(f"cannot describe the model for a .kdbnn: {exc}") from None
    try:
        return {"family": sk["family"], "options": check_skeleton(sk["family"], sk.get("options"))}
    except SkeletonError as exc:
        raise ExportError(f"cannot describe the model for a .kdbnn: {exc}") from None


def _f32_repr(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (18.304, not 18.304000854...)."""
    import numpy as np

    return float(str(np.float32(v)))


def _anchors(model: nn.Module) -> list[list[list[float]]]:
    out = []
    for m in model.modules():
        a = getattr(m, "anchors_px", None)
        if isinstance(a, torch.Tensor):
            out.append([[_f32_repr(v) for v in row] for row in a.detach().cpu().double().reshape(-1, 2).tolist()])
    return out


# ----------------------------------------------------------------------------- layer table + plan


def _binary_opts(m: BinaryConv2d) -> dict[str, Any]:
    return {"mode": m.mode, "pad_value": float(m.pad_value), "weight_scaling": m.weight_scaling,
            "input_scaling": m.input_scaling}


def layer_table(model: nn.Module) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The layer table and the file-level binary defaults of a model (see the module docstring).

    Returns ``(layers, binary)``: ``layers`` in ``named_modules`` order, one entry per module that
    stores tensors; ``binary`` = the most common value of each of :data:`BINARY_OPTIONS` among the
    binary convs (first seen wins a tie) and ``num_binary_convs``; an entry repeats an option
    only where it differs.
    """
    pairs = conv_bn_pairs(model)
    owned = owned_tensors(model)
    convs = {path for path, m, own in owned if is_stored_conv(m, own)}
    folded = {pairs[c] for c in convs if c in pairs}
    layers: list[dict[str, Any]] = []
    opts: dict[str, dict[str, Any]] = {}
    for path, m, own in owned:
        if path in convs:
            e: dict[str, Any] = {"path": path,
                                 "kind": "binary_conv" if isinstance(m, BinaryConv2d) else "float_conv"}
            if path in pairs:
                e["bn"] = pairs[path]
            if isinstance(m, BinaryConv2d):
                opts[path] = _binary_opts(m)
            layers.append(e)
        elif own and path not in folded:
            kind = "bn" if isinstance(m, nn.modules.batchnorm._BatchNorm) else "other"
            layers.append({"path": path, "kind": kind})
    binary: dict[str, Any] = {"num_binary_convs": len(opts)}
    for key in BINARY_OPTIONS:
        counts = Counter(o[key] for o in opts.values())
        if counts:
            binary[key] = counts.most_common(1)[0][0]
    for e in layers:
        for key, value in opts.get(e["path"], {}).items():
            if value != binary[key]:
                e[key] = value
    return layers, binary


def _add_act_scales(model: nn.Module, layers: list[dict[str, Any]], act_scales: dict[str, float]) -> None:
    """Put each W1A8 conv's input scale on its layer entry (ExportError for a path that is not a
    W1A8-capable conv of the model, or a scale that is not a positive finite number)."""
    modules = dict(model.named_modules())
    entries = {e["path"]: e for e in layers}
    for path, scale in act_scales.items():
        why = w1a8_reason(modules[path]) if path in modules else "no such module"
        if why is not None or path not in entries:
            raise ExportError(f"act_scales: '{path}' cannot run with 8-bit activations ({why or 'not stored'})")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ExportError(f"act_scales: '{path}' has scale {scale!r}, expected a positive finite number")
        entries[path]["act_scale"] = _f32_repr(scale)


# ----------------------------------------------------------------------------- export


def _conv_values(m: nn.Conv2d, binary: bool, bn: nn.Module | None) -> dict[str, torch.Tensor]:
    """The stored roles of a conv (module docstring): packed words + alpha + folded affine, or
    the BN-folded float weight + bias."""
    out: dict[str, torch.Tensor] = {}
    bias = m.bias.detach().double() if m.bias is not None else None
    if binary:
        out["words"] = pack_signs(m.weight.detach().cpu())
        out["alpha"] = m.weight_scale().detach().cpu().float()
        if bn is not None:
            s, t = bn_affine(bn)
            if bias is not None:
                t = t + bias * s
            out["bn_scale"], out["bn_shift"] = s.float(), t.float()
        elif bias is not None:
            out["bias"] = bias.float()
        return out
    w = m.weight.detach().double()
    if bn is not None:
        s, t = bn_affine(bn)
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
        bias = t + (bias * s if bias is not None else 0.0)
    out["weight"] = w.float()
    if bias is not None:
        out["bias"] = bias.float()
    return out


@torch.no_grad()
def build_payload(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """The blobs, the layer table and the binary defaults of a model (see the module docstring)."""
    layers, binary = layer_table(model)
    disabled = [e["path"] for e in layers if e["kind"] == "binary_conv"
                and not model.get_submodule(e["path"]).enabled]
    if disabled:
        warnings.warn(f"{len(disabled)} binary conv(s) are disabled (their binarization stage has "
                      f"not started), e.g. {disabled[:3]}; they are exported binary anyway",
                      RuntimeWarning, stacklevel=3)
    try:
        slots, totals = tensor_plan(model, layers)
    except FormatError as exc:
        raise ExportError(str(exc)) from exc
    entries = {e["path"]: e for e in layers}
    planned: dict[str, set[str]] = {}
    for s in slots:
        planned.setdefault(s.path, set()).add(s.role)
    cache: dict[str, dict[str, torch.Tensor]] = {}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in totals}
    for s in slots:
        m = model.get_submodule(s.path)
        if s.path not in cache:  # slots of one module are consecutive: keep one module's values
            e = entries[s.path]
            vals: dict[str, torch.Tensor] = {}
            if e["kind"] in CONV_KINDS:
                bn = model.get_submodule(e["bn"]) if e.get("bn") else None
                vals = _conv_values(m, e["kind"] == "binary_conv", bn)
                if not set(vals) <= planned[s.path]:
                    raise ExportError(f"'{s.path}': computed roles {sorted(vals)}, the layout plans "
                                      f"{sorted(planned[s.path])}")
            cache = {s.path: vals}
        vals = cache[s.path]
        if s.role in vals:
            v = vals[s.role]
        else:
            v = m._parameters.get(s.role)
            v = stored_tensor(v if v is not None else m._buffers[s.role])
        if tuple(v.shape) != s.shape:
            raise ExportError(f"'{s.path}' role '{s.role}' has shape {tuple(v.shape)}, the layout "
                              f"expects {s.shape}")
        parts[s.blob].append(v.detach().cpu().reshape(-1).to(BLOB_DTYPES[s.blob]))
    blobs = {k: torch.cat(v) for k, v in parts.items()}
    return blobs, layers, binary


def _check_rebuild(meta: dict[str, Any], slots: list[Slot]) -> None:
    """Rebuild the skeleton from ``meta`` (as the loader will) and require the same layout."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = build_skeleton(meta)
    except Exception as exc:  # noqa: BLE001 - whatever stops the rebuild would stop the loader too
        raise ExportError(f"the file would not load: rebuilding the skeleton {meta.get('skeleton', {}).get('family')!r} "
                          f"from the metadata failed ({type(exc).__name__}: {exc})") from exc
    try:
        again, _ = tensor_plan(skeleton, meta["layers"])
    except FormatError as exc:
        raise ExportError(f"the file would not load: {exc}") from exc
    for a, b in zip(slots, again):
        if a != b:
            raise ExportError(f"the skeleton rebuilt from the metadata differs from the model: the model "
                              f"stores {a}, the skeleton {b}")
    if len(again) != len(slots):
        raise ExportError(f"the skeleton rebuilt from the metadata stores {len(again)} tensors, the model "
                          f"{len(slots)}")


def export(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, int] | None = None,
           extra_meta: dict[str, Any] | None = None, verify: bool = True,
           act_scales: dict[str, float] | None = None, calibration_images: int = 0) -> dict[str, Any]:
    """Write ``model`` (a binary student, or any Detector) as a ``.kdbnn`` file.

    Args:
        model: the student (eval-mode maps are what the file reproduces).
        path: output file (written atomically).
        input_size: (H, W); default ``model.input_size``.
        extra_meta: merged into the metadata; ``extra_meta["skeleton"]`` describes how to rebuild
            a non-Darknet model (see :func:`skeleton_of`).
        verify: rebuild the skeleton from the metadata and check that its tensor layout equals
            the model's (the file will load) before writing.
        act_scales: W1A8 (`kd_bnn.deploy.quantize`): the 8-bit input scale of each binary-weight
            conv that runs on int8 activations (`calibrate_activations`); the file is then format
            version 3. ``calibration_images``: how many images measured them (recorded).

    Returns:
        a report: ``file_bytes``, ``tensor_bytes`` (the weight blobs, = ``predicted_packed_bytes``),
        ``header_bytes`` (file - tensor bytes: the safetensors header plus the compressed
        metadata tensor), ``meta_bytes`` (that tensor alone), ``float32_bytes``,
        ``predicted_packed_bytes``, ``compression`` (float32 / file), ``size_vs_prediction``
        (file / predicted), counts of binary / float convs, ``binary_mac_fraction`` (binary MACs /
        all conv MACs at ``input_size``).
    """
    extra = dict(extra_meta or {})
    skeleton = skeleton_of(model, extra)
    extra.pop("skeleton", None)
    size = tuple(int(v) for v in (input_size or model.input_size))
    blobs, layers, binary = build_payload(model)
    meta = {
        "kind": META_KIND,
        "class_names": [str(c) for c in getattr(model, "class_names", [])],
        "input_size": list(size),
        "anchors": _anchors(model),
        "skeleton": skeleton,
        "binary": binary,
        "layers": layers,
        **extra,
    }
    blocks = block_specs_of(model)
    if blocks:
        meta["blocks"] = blocks
    version = MIN_FORMAT_VERSION
    if act_scales:
        _add_act_scales(model, layers, act_scales)
        meta["activations"] = {"bits": ACT_BITS, "calibration_images": int(calibration_images), "statistic": "max"}
        version = 3
    if verify:
        _check_rebuild(meta, tensor_plan(model, layers)[0])
    file_bytes = save_container(path, blobs, meta, version=version)
    tensor_bytes = sum(t.numel() * t.element_size() for t in blobs.values())
    predicted = packed_model_bytes(model)
    f32 = float32_model_bytes(model)
    return {
        "path": str(path),
        "file_bytes": file_bytes,
        "tensor_bytes": tensor_bytes,
        "header_bytes": file_bytes - tensor_bytes,
        "meta_bytes": int(encode_meta(meta).numel()),
        "float32_bytes": f32,
        "predicted_packed_bytes": predicted,
        "compression": f32 / file_bytes,
        "predicted_compression": f32 / predicted if predicted else math.nan,
        "size_vs_prediction": file_bytes / predicted if predicted else math.nan,
        "num_binary_convs": binary["num_binary_convs"],
        "num_float_convs": sum(1 for e in layers if e["kind"] == "float_conv"),
        "binary_mac_fraction": summary(model, size, print_fn=None)["totals"]["binary_mac_fraction"],
        "input_size": list(size),
    }
