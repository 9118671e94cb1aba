"""The ``.kdbnn`` model description, shared by the writer (`kd_bnn.deploy.export`) and the
reader (`kd_bnn.deploy.runtime`): the skeleton rebuild, the tensor plan and the blob cut.

Tensors live in a few flat 1-D blobs, one per storage type (``bits`` int64 packed signs,
``f32`` float32, ``i32`` int32). Which slice of which blob is which module's which role, and its
shape, is not stored: it is :func:`tensor_plan` of the module tree and the layer table, walked in
``named_modules`` order. The exporter runs it on the student, the loader on the skeleton it
rebuilds from the file, so the two cannot drift. The full layout, roles and metadata keys:
docs/architecture.md, "The .kdbnn file".
BN folding: ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` (Ioffe & Szegedy 2015).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.blocks import apply_blocks, check_block_specs
from kd_bnn.binary.layers import conv_explicit_padding
from kd_bnn.binary.summary import conv_bn_pairs, owned_tensors
from kd_bnn.deploy.format import FormatError
from kd_bnn.models.detector import SkeletonError, build_from_skeleton

__all__ = [
    "BINARY_OPTIONS",
    "BLOB_DTYPES",
    "LAYER_KINDS",
    "META_KIND",
    "Slot",
    "binary_conv_spec",
    "binary_options",
    "bn_affine",
    "build_skeleton",
    "is_stored_conv",
    "owned_tensors",
    "skipped_init",
    "split_blobs",
    "stored_tensor",
    "tensor_plan",
]

META_KIND = "kdbnn-model"
LAYER_KINDS = ("binary_conv", "float_conv", "bn", "other")
BINARY_OPTIONS = ("mode", "pad_value", "weight_scaling", "input_scaling")
BLOB_DTYPES = {"bits": torch.int64, "f32": torch.float32, "i32": torch.int32}
CONV_KINDS = ("binary_conv", "float_conv")
WORD_BITS = 64


#: ``torch.nn.init`` functions that `skipped_init` turns into no-ops.
_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
             "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
             "sparse_")


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """Modules built inside keep their parameters uninitialised (``torch.nn.init`` is a no-op).

    For a tree whose every stored tensor is about to be overwritten from a file or dropped (the
    loader's skeleton: `tensor_plan` refuses a tree with tensors no entry covers): the weights
    are ``torch.empty`` pages that are never written, so they never become resident - the binary
    convs' float weights, 30x the packed model, no longer pass through memory at load time.
    Buffers computed by the modules themselves (anchors, grids) are unaffected.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FNS}
    try:
        for name in _INIT_FNS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_skeleton(meta: dict[str, Any], initialize: bool = True) -> nn.Module:
    """The float module tree of an exported model (no weights loaded; ``initialize=False``: not
    even initialised, see `skipped_init`).

    The file is data: the tree comes from a registered family and options checked against that
    family's schema (a Darknet model's options are its cfg text) - never from a file it names.
    Binary blocks (metadata ``blocks``: conv path -> shortcut / rsign / rprelu, plain values
    checked against the rebuilt tree) are re-applied by `kd_bnn.binary.blocks.apply_blocks`.
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
        with skipped_init() if not initialize else contextlib.nullcontext():
            model = build_from_skeleton(sk.get("family"), sk.get("options"), names, tuple(size))
    except SkeletonError as exc:
        raise FormatError(str(exc)) from None
    if meta.get("blocks"):
        try:
            apply_blocks(model, check_block_specs(model, meta["blocks"], "metadata 'blocks'"))
        except ValueError as exc:
            raise FormatError(str(exc)) from None
    return model


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


def is_stored_conv(m: nn.Module, own: list[tuple[str, torch.Tensor]]) -> bool:
    return isinstance(m, nn.Conv2d) and any(k == "weight" for k, _ in own)


def stored_tensor(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.float().contiguous()
    return t.to(torch.int32).contiguous()


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
        if e["kind"] in CONV_KINDS:
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

    for path, m, own in owned_tensors(model):
        e = table.get(path)
        if e is None:
            if path not in folded:
                unset += [f"{path}.{k}" if path else k for k, _ in own]
            continue
        if not own:
            raise FormatError(f"layer '{path}' holds no tensors in the rebuilt {type(model).__name__}")
        kind = e["kind"]
        skip: set[str] = set()
        if kind in CONV_KINDS:
            if not is_stored_conv(m, own):
                raise FormatError(f"layer '{path}' is a {kind} in the table but a {type(m).__name__} "
                                  "without a weight of its own in the rebuilt model")
            c_out = int(m.out_channels)
            has_bias = m.bias is not None
            if kind == "binary_conv":
                if m.groups != 1:
                    raise FormatError(f"binary layer '{path}' has groups={m.groups}: cannot be packed")
                kh, kw = m.kernel_size
                add(path, "words", "bits", (c_out, kh * kw, math.ceil(m.in_channels / WORD_BITS)))
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
