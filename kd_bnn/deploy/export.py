"""Export a binary student to a bit-packed ``.kdbnn`` file (and a float-equivalent ONNX graph).

File layout (format version 2; container: :mod:`kd_bnn.deploy.format`, a checksummed
safetensors file whose header metadata holds only format, version, metadata encoding and
checksum; the model description is a JSON document stored zlib-compressed, with a fixed preset
dictionary, as the uint8 tensor ``meta``, so the checksum covers it):

* **Tensors**: a few flat 1-D blobs, one per storage type, only those that are non-empty:

  - ``bits`` int64: every binary conv's ``pack_signs(W)`` words (C_out, KH*KW, ceil(C_in/64)),
    see :mod:`kd_bnn.deploy.pack`, concatenated;
  - ``f32`` float32: every float tensor, concatenated;
  - ``i32`` int32: integer buffers (rare).

  Which slice of which blob is which module's which role, and its shape, is *not stored*: it is
  :func:`tensor_plan` of the module tree and the layer table, walked in ``named_modules`` order.
  The exporter runs it on the student, the loader on the skeleton it rebuilds from the file, so
  the two cannot drift (the exporter also rebuilds the skeleton and checks that both plans are
  equal; the loader checks that each blob's length equals the plan's total). Roles per module:

  - ``binary_conv``: ``words`` (bits), ``alpha`` (C_out,) = ``BinaryConv2d.weight_scale()``;
    with a folded BatchNorm ``bn_scale``, ``bn_shift`` (C_out,) such that
    ``BN(conv + b) = conv*bn_scale + bn_shift`` (the conv bias is folded into the shift),
    otherwise ``bias`` if the conv has one;
  - ``float_conv``: ``weight`` (BN folded in: ``W*s``) and ``bias`` (``b*s + t`` when folded;
    the conv's own bias otherwise, if any);
  - then, for a conv, any other own parameter / persistent buffer it holds (not ``scale``, which
    is in ``alpha``), and for ``bn`` (unfolded) / ``other`` modules every own parameter /
    persistent buffer (except ``num_batches_tracked``), under its state-dict name, in
    ``_parameters`` then ``_buffers`` order: floats in ``f32``, integers in ``i32`` (4 bytes an
    element either way); a tensor shared by several modules is stored once, at its first owner.

* **Metadata** (the ``meta`` tensor): ``kind: "kdbnn-model"``, class names, input size
  ``[H, W]``, anchors (pixels, per head, informational, float32 precision), ``skeleton`` - what
  rebuilds the float module tree, ``{"family": F, "options": {...}}`` checked against the family's
  skeleton schema (a Darknet model's only option is its ``cfg_text``), ``binary`` - the file-level binary options (``mode``, ``pad_value``,
  ``weight_scaling``, ``input_scaling``: the most common value among the binary convs) and
  ``num_binary_convs``, ``source`` (config and checkpoint), and ``layers``: one entry per module
  that stores tensors, in ``named_modules`` order, holding only what the skeleton cannot tell::

      {"path": "layers.2.conv", "kind": "binary_conv" | "float_conv" | "bn" | "other",
       "bn": "layers.2.bn" (conv kinds, when a BatchNorm is folded in),
       "mode" / "pad_value" / "weight_scaling" / "input_scaling": only where they differ from
       the file-level ``binary`` defaults}

  Geometry (channels, kernel, stride, padding, bias) comes from the rebuilt module; a table
  that does not fit the skeleton (unknown path, a conv kind on a non-conv, a BN that is not the
  conv's :func:`~kd_bnn.binary.summary.conv_bn_pairs` partner, a tensor left unset) is a
  ``FormatError`` naming the module.

Which BN is folded, and so the exact byte count, is :func:`kd_bnn.binary.summary.conv_bn_pairs`;
the blob bytes equal :func:`kd_bnn.binary.summary.packed_model_bytes` exactly, and the file adds
only the safetensors header (about 0.4 KB: four metadata strings and 3-4 tensor entries) and
the compressed metadata. Measured (file - predicted bytes): demo BWN student 772 B (0.52% of
148,192; the metadata tensor 380 B, its cfg text included), BinaryDenseNet demo 725 B (0.73%),
Bi-Real demo 700 B (0.45%), DarkNet-19 YOLOv2 KITTI BWN 867 B (0.013% of 6.6 MB). Format 1
(per-tensor entries and a plain-JSON layer table with geometry in the header) added 12 KB
(8.4%) to the demo student.
BN folding: ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (Ioffe & Szegedy 2015).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d, conv_explicit_padding
from kd_bnn.binary.summary import conv_bn_pairs, float32_model_bytes, packed_model_bytes
from kd_bnn.deploy.format import FormatError, encode_meta, save_container
from kd_bnn.deploy.pack import pack_signs
from kd_bnn.models.detector import SkeletonError, build_from_skeleton, check_skeleton

__all__ = [
    "BINARY_OPTIONS",
    "BLOB_DTYPES",
    "ExportError",
    "LAYER_KINDS",
    "Slot",
    "binary_conv_spec",
    "binary_options",
    "bn_affine",
    "build_payload",
    "build_skeleton",
    "check_outputs",
    "export",
    "export_checkpoint",
    "export_onnx",
    "float_equivalent",
    "layer_table",
    "skeleton_of",
    "split_blobs",
    "tensor_plan",
]

META_KIND = "kdbnn-model"
LAYER_KINDS = ("binary_conv", "float_conv", "bn", "other")
BINARY_OPTIONS = ("mode", "pad_value", "weight_scaling", "input_scaling")
BLOB_DTYPES = {"bits": torch.int64, "f32": torch.float32, "i32": torch.int32}
_CONV_KINDS = ("binary_conv", "float_conv")
_SKIP = ("num_batches_tracked",)
_WORD_BITS = 64


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


def build_skeleton(meta: dict[str, Any]) -> nn.Module:
    """The float module tree of an exported model (no weights loaded).

    The file is data: the tree comes from a registered family and options checked against that
    family's schema (a Darknet model's options are its cfg text) - never from a file it names.
    A skeleton without ``options`` holds them beside ``family`` (files written before options
    were nested: ``{"family": "darknet", "cfg_text": ...}``) and reads the same.
    """
    import kd_bnn.models  # noqa: F401  (registers the families and their skeleton schemas)

    sk = meta.get("skeleton")
    if not isinstance(sk, dict):
        raise FormatError(f"metadata 'skeleton': expected a mapping, found {type(sk).__name__}")
    if "options" not in sk:
        sk = {"family": sk.get("family"), "options": {k: v for k, v in sk.items() if k != "family"}}
    names = meta.get("class_names") or []
    size = meta.get("input_size")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise FormatError(f"metadata 'class_names': expected a list of strings, found {names!r:.80}")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        raise FormatError(f"metadata 'input_size': expected [height, width] positive integers, found {size!r:.80}")
    extra = sorted(str(k) for k in sk if k not in ("family", "options"))
    if extra:
        raise FormatError(f"metadata 'skeleton' of family {sk.get('family')!r}: unknown keys {extra}; "
                          "allowed: ['family', 'options']")
    try:
        return build_from_skeleton(sk.get("family"), sk.get("options"), names, tuple(size))
    except SkeletonError as exc:
        raise FormatError(str(exc)) from None


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


def _owned(model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, torch.Tensor]]]]:
    """``(path, module, own tensors)`` in ``named_modules`` order, each tensor at its first owner."""
    seen: set[int] = set()
    out = []
    for path, m in model.named_modules():
        own = []
        for k, t in _own_tensors(m):
            if id(t) not in seen:
                seen.add(id(t))
                own.append((k, t))
        out.append((path, m, own))
    return out


def _is_stored_conv(m: nn.Module, own: list[tuple[str, torch.Tensor]]) -> bool:
    return isinstance(m, nn.Conv2d) and any(k == "weight" for k, _ in own)


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.float().contiguous()
    return t.to(torch.int32).contiguous()


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
    owned = _owned(model)
    convs = {path for path, m, own in owned if _is_stored_conv(m, own)}
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


def binary_options(entry: dict[str, Any], binary: dict[str, Any]) -> dict[str, Any]:
    """A binary conv entry's options: the file-level defaults overridden by the entry."""
    out = {key: entry.get(key, binary.get(key)) for key in BINARY_OPTIONS}
    path = entry.get("path")
    if out["mode"] not in ("bwn", "xnor"):
        raise FormatError(f"binary layer '{path}': mode {out['mode']!r} is not 'bwn' or 'xnor'")
    if not isinstance(out["pad_value"], (int, float)) or isinstance(out["pad_value"], bool):
        raise FormatError(f"binary layer '{path}': pad_value {out['pad_value']!r} is not a number")
    if not isinstance(out["input_scaling"], str):
        raise FormatError(f"binary layer '{path}': input_scaling {out['input_scaling']!r} is not a name")
    out["pad_value"] = float(out["pad_value"])
    return out


@dataclass(frozen=True)
class Slot:
    """One stored tensor: ``blob[offset : offset + numel]`` viewed as ``shape`` is ``path``'s ``role``."""

    path: str
    role: str
    blob: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_plan(model: nn.Module, layers: list[dict[str, Any]]) -> tuple[list[Slot], dict[str, int]]:
    """Where every stored tensor of ``model`` lives in the blobs, from its module tree and the
    layer table (the one layout function used by the exporter and the loader).

    Walks ``model.named_modules()``; for each module with an entry, emits the roles of its kind
    (module docstring) with shapes from the module itself. Returns ``(slots, totals)``, totals
    being the element count of each blob. Raises ``FormatError`` naming the module when the
    table does not fit the tree: a path that does not exist or holds no tensors, an unknown
    kind, a conv kind on a non-conv, a grouped binary conv, a folded BN that is not the conv's
    ``conv_bn_pairs`` partner, or tensors of the tree that no entry covers.
    """
    if not isinstance(layers, list):
        raise FormatError(f"the layer table must be a list, found {type(layers).__name__}")
    modules = dict(model.named_modules())
    table: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(layers):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise FormatError(f"layer table entry {i} is not an object with a 'path' string: {e!r:.80}")
        path = e["path"]
        if e.get("kind") not in LAYER_KINDS:
            raise FormatError(f"layer '{path}': unknown kind {e.get('kind')!r} (expected one of {LAYER_KINDS})")
        if path in table:
            raise FormatError(f"layer '{path}' appears twice in the layer table")
        if path not in modules:
            raise FormatError(f"layer '{path}' of the layer table does not exist in the rebuilt "
                              f"{type(model).__name__}")
        table[path] = e
    pairs = conv_bn_pairs(model)
    folded: dict[str, str] = {}
    for path, e in table.items():
        bn = e.get("bn")
        if e["kind"] in _CONV_KINDS:
            if bn != pairs.get(path):
                raise FormatError(f"layer '{path}': the table folds BatchNorm {bn!r} into it, the rebuilt "
                                  f"model pairs it with {pairs.get(path)!r}")
            if bn is not None:
                if bn in table:
                    raise FormatError(f"layer '{bn}' is folded into '{path}' and has an entry of its own")
                folded[bn] = path
        elif bn is not None:
            raise FormatError(f"layer '{path}' of kind {e['kind']!r} cannot hold a folded BatchNorm")

    slots: list[Slot] = []
    totals = dict.fromkeys(BLOB_DTYPES, 0)
    unset: list[str] = []

    def add(path: str, role: str, blob: str, shape: tuple[int, ...]) -> None:
        slots.append(Slot(path, role, blob, totals[blob], tuple(int(d) for d in shape)))
        totals[blob] += math.prod(shape)

    for path, m, own in _owned(model):
        e = table.get(path)
        if e is None:
            if path not in folded:
                unset += [f"{path}.{k}" if path else k for k, _ in own]
            continue
        if not own:
            raise FormatError(f"layer '{path}' holds no tensors in the rebuilt {type(model).__name__}")
        kind = e["kind"]
        skip: set[str] = set()
        if kind in _CONV_KINDS:
            if not _is_stored_conv(m, own):
                raise FormatError(f"layer '{path}' is a {kind} in the table but a {type(m).__name__} "
                                  "without a weight of its own in the rebuilt model")
            c_out = int(m.out_channels)
            has_bias = m.bias is not None
            if kind == "binary_conv":
                if m.groups != 1:
                    raise FormatError(f"binary layer '{path}' has groups={m.groups}: cannot be packed")
                kh, kw = m.kernel_size
                add(path, "words", "bits", (c_out, kh * kw, math.ceil(m.in_channels / _WORD_BITS)))
                add(path, "alpha", "f32", (c_out,))
                if path in pairs:
                    add(path, "bn_scale", "f32", (c_out,))
                    add(path, "bn_shift", "f32", (c_out,))
                elif has_bias:
                    add(path, "bias", "f32", (c_out,))
                skip = {"weight", "bias", "scale"}
            else:
                add(path, "weight", "f32", tuple(m.weight.shape))
                if path in pairs or has_bias:
                    add(path, "bias", "f32", (c_out,))
                skip = {"weight", "bias"}
        for k, t in own:
            if k not in skip:
                add(path, k, "f32" if t.is_floating_point() else "i32", tuple(t.shape))
    if unset:
        raise FormatError(f"the layer table leaves {len(unset)} tensor(s) of the rebuilt "
                          f"{type(model).__name__} unset, e.g. {unset[:5]}")
    return slots, {k: v for k, v in totals.items() if v}


def split_blobs(blobs: dict[str, torch.Tensor], slots: list[Slot],
                totals: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {role: tensor}}`` cut from the blobs by the plan (each a copy, so the
    blobs can be freed). Raises ``FormatError`` when a blob is missing, unexpected, of the wrong
    dtype, or not exactly as long as the plan needs."""
    for name in sorted(set(blobs) - set(totals)):
        raise FormatError(f"unexpected tensor '{name}' ({blobs[name].numel()} elements): the layout of "
                          f"the rebuilt model needs only {sorted(totals)}")
    for name, need in totals.items():
        if name not in blobs:
            raise FormatError(f"blob '{name}' is missing: the layout of the rebuilt model needs {need} "
                              f"{BLOB_DTYPES[name]} elements")
        b = blobs[name]
        if b.dtype != BLOB_DTYPES[name] or b.dim() != 1:
            raise FormatError(f"blob '{name}' must be 1-D {BLOB_DTYPES[name]}, found {b.dtype} "
                              f"of shape {tuple(b.shape)}")
        if b.numel() != need:
            raise FormatError(f"blob '{name}' holds {b.numel()} elements, the layout of the rebuilt "
                              f"model needs {need}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for s in slots:
        t = blobs[s.blob][s.offset:s.offset + s.numel].reshape(s.shape).clone()
        out.setdefault(s.path, {})[s.role] = t
    return out


def binary_conv_spec(path: str, conv: nn.Conv2d, opts: dict[str, Any]) -> dict[str, Any]:
    """What :class:`kd_bnn.deploy.runtime.PackedBinaryConv` needs: geometry from the (rebuilt)
    conv, binary options from :func:`binary_options`."""
    return {"path": path, "in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
            "padding": list(conv_explicit_padding(conv)), "dilation": list(conv.dilation),
            "padding_mode": conv.padding_mode, **opts}


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
            if e["kind"] in _CONV_KINDS:
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
            v = _as_stored(v if v is not None else m._buffers[s.role])
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
           extra_meta: dict[str, Any] | None = None, verify: bool = True) -> dict[str, Any]:
    """Write ``model`` (a binary student, or any Detector) as a ``.kdbnn`` file.

    Args:
        model: the student (eval-mode maps are what the file reproduces).
        path: output file (written atomically).
        input_size: (H, W); default ``model.input_size``.
        extra_meta: merged into the metadata; ``extra_meta["skeleton"]`` describes how to rebuild
            a non-Darknet model (see :func:`skeleton_of`).
        verify: rebuild the skeleton from the metadata and check that its tensor layout equals
            the model's (the file will load) before writing.

    Returns:
        a report: ``file_bytes``, ``tensor_bytes`` (the weight blobs, = ``predicted_packed_bytes``),
        ``header_bytes`` (file - tensor bytes: the safetensors header plus the compressed
        metadata tensor), ``meta_bytes`` (that tensor alone), ``float32_bytes``,
        ``predicted_packed_bytes``, ``compression`` (float32 / file), ``size_vs_prediction``
        (file / predicted), counts of binary / float convs.
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
    if verify:
        _check_rebuild(meta, tensor_plan(model, layers)[0])
    file_bytes = save_container(path, blobs, meta)
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
        "input_size": list(size),
    }


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse outputs that would destroy something: a folder, one of the inputs, another output,
    or an existing file that is not a ``.kdbnn`` (for the ``.kdbnn`` output). ``outputs`` and
    ``inputs`` map option names (``--out``) to paths; None entries are ignored."""
    from kd_bnn.deploy.format import is_kdbnn_file

    seen: dict[Path, str] = {Path(v).resolve(): k for k, v in inputs.items() if v is not None}
    for key, value in outputs.items():
        if value is None:
            continue
        p = Path(value)
        if p.is_dir():
            raise ExportError(f"{key} {p}: is a folder; give a file path such as {p / 'model.kdbnn'}")
        r = p.resolve()
        if r in seen:
            raise ExportError(f"{key} {p}: is also the {seen[r]} path; writing there would destroy it")
        seen[r] = key
        if key == "--out" and p.is_file() and not is_kdbnn_file(p):
            raise ExportError(f"{key} {p}: exists and is not a .kdbnn file; refusing to replace it "
                              "(choose another path or remove it yourself)")


def _check_checkpoint_fits(state: dict[str, Any], cfg: Any, checkpoint: str | os.PathLike,
                           allow_float: bool, allow_input_size: bool) -> None:
    """A checkpoint exported as the student must hold a binary student trained at the export's
    input size, unless the caller opts in (see :func:`export_checkpoint`)."""
    size = [int(v) for v in state.get("input_size") or []]
    want = [int(v) for v in cfg.data.input_size]
    if size and size != want and not allow_input_size:
        raise ExportError(
            f"checkpoint {checkpoint} was trained at input size {size} (height, width), but the export "
            f"uses data.input_size={want}; add the override data.input_size=[{size[0]},{size[1]}] to export at "
            "the training size, or --allow-input-size-change to export at the config's size")
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    binary_convs = state.get("binary_convs")
    is_float = binary_convs == 0 if binary_convs is not None else ("student" in saved and saved["student"] is None)
    if cfg.student is not None and is_float and not allow_float:
        raise ExportError(
            f"checkpoint {checkpoint} holds a float model (no binary convs: a teacher), but the config "
            "describes a binary student; exporting it would binarize the float weights without training. "
            "Export the student's checkpoint (runs/<name>/best.pt), or pass --binarize-float to do exactly that")


def export_checkpoint(config: str | os.PathLike | Any, checkpoint: str | os.PathLike | None,
                      out: str | os.PathLike, overrides: list[str] | None = None,
                      onnx: str | os.PathLike | None = None, allow_float: bool = False,
                      allow_input_size_change: bool = False) -> dict[str, Any]:
    """Rebuild the student of an experiment config (from ``checkpoint``, or randomly initialised
    when None, to size an architecture before training) and export it to ``out``.

    Refused: an ``out`` / ``onnx`` that is a folder, the checkpoint or config itself, or an existing
    non-``.kdbnn`` file; a float (teacher) checkpoint for a binary student unless ``allow_float``;
    a checkpoint trained at another input size unless ``allow_input_size_change``.
    Returns the :func:`export` report plus ``config``, ``checkpoint`` and (with ``onnx``) the
    ONNX result.
    """
    from kd_bnn.config import ExperimentConfig, load_config

    config_path = None if isinstance(config, ExperimentConfig) else config
    check_outputs({"--out": out, "--onnx": onnx}, {"--checkpoint": checkpoint, "--config": config_path})
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
        from kd_bnn.engine.checkpoint import load_checkpoint
        from kd_bnn.engine.experiment import load_student

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        _check_checkpoint_fits(load_checkpoint(checkpoint), cfg, checkpoint, allow_float, allow_input_size_change)
        model = load_student(cfg, checkpoint)
    model.eval()
    extra: dict[str, Any] = {"source": {"config": str(config) if not isinstance(config, ExperimentConfig)
                                        else cfg.name, "checkpoint": None if checkpoint is None else str(checkpoint)}}
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
