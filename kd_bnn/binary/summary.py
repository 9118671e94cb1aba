"""Model summary with exact packed-size accounting (larq.models.summary, for PyTorch binary models).

The packed size is the contract the ``.kdbnn`` exporter meets byte for byte. It is defined once,
here, by :func:`packed_conv_bytes` / :func:`packed_layer_bytes` / :func:`packed_model_bytes`:

* A **binary conv** (every ``BinaryConv2d``, whether or not its stage has started) stores
  - its signs in uint64 words of shape (C_out, KH*KW, ceil(C_in_per_group / 64)): 8 bytes a word;
  - one float32 scale (alpha) per output channel (ones when ``weight_scaling='none'``; the
    ``learned`` scale *is* this scale);
  - with a folded BatchNorm: 2 float32 per output channel (scale, shift; the conv bias, if any,
    is folded into the shift); without: its bias, 1 float32 per output channel, if it has one.
* A **float conv** stores float32 weights; with a folded BatchNorm the BN goes into the weights
  and a bias (always present then, C_out floats); without, its bias if it has one.
* A BatchNorm is **folded** when it directly follows a conv: the next module after an
  ``nn.Conv2d`` in an ``nn.Sequential``, or the ``bn`` / ``norm`` child of a module whose ``conv``
  child is the conv and its only conv child (Ultralytics ``Conv``, Darknet-style blocks) — see
  :func:`conv_bn_pairs`.
  It must be a ``BatchNorm2d`` with running stats and ``num_features == conv.out_channels``.
  A folded BN stores nothing of its own.
* **Everything else** the forward needs: every other parameter and persistent buffer (what
  ``state_dict`` holds, each tensor once), as float32, 4 bytes per element, except
  ``num_batches_tracked`` (never needed at inference). Unfolded BNs keep all 4 vectors.

``float32_bytes`` is the model as trained: 4 bytes per element of every parameter and persistent
buffer (each once), except ``num_batches_tracked`` — the size of a Darknet ``.weights`` file.
Compression = float32_bytes / packed_bytes. KB = 1024 bytes, MB = 1024**2 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d

WORD_BITS = 64
FLOAT_BYTES = 4
_SKIP_BUFFERS = ("num_batches_tracked",)


# ----------------------------------------------------------------------------- folding


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Conv path -> path of the BatchNorm folded into it (see the module docstring for the rule)."""
    path_of: dict[int, str] = {}
    for name, m in model.named_modules():
        path_of.setdefault(id(m), name)
    pairs: dict[str, str] = {}
    used: set[int] = set()

    def add(conv: nn.Module, bn: nn.Module) -> None:
        cp = path_of[id(conv)]
        if cp not in pairs and id(bn) not in used and _foldable(conv, bn):
            pairs[cp] = path_of[id(bn)]
            used.add(id(bn))

    for m in model.modules():
        children = [c for c in m._modules.values() if c is not None]
        if isinstance(m, nn.Sequential):
            for a, b in zip(children, children[1:]):
                add(a, b)
        conv = m._modules.get("conv")
        # attribute blocks (Ultralytics Conv, Darknet-style): only when `conv` is the block's only
        # conv child (Ultralytics Conv2 sums two convs before its BN: nothing to fold into one)
        if conv is not None and sum(isinstance(c, nn.modules.conv._ConvNd) for c in children) == 1:
            for key in ("bn", "norm"):
                bn = m._modules.get(key)
                if bn is not None:
                    add(conv, bn)
                    break
    return pairs


# ----------------------------------------------------------------------------- packed size


def packed_conv_bytes(c_out: int, c_in_per_group: int, kh: int, kw: int, *, binary: bool,
                      bias: bool, folded_bn: bool) -> int:
    """Bytes a conv takes in the export (the rule in the module docstring), from its shape alone."""
    if binary:
        words = c_out * kh * kw * math.ceil(c_in_per_group / WORD_BITS)
        n = words * 8 + FLOAT_BYTES * c_out  # signs + alpha
        if folded_bn:
            return n + 2 * FLOAT_BYTES * c_out  # BN scale + shift
        return n + (FLOAT_BYTES * c_out if bias else 0)
    n = FLOAT_BYTES * c_out * c_in_per_group * kh * kw
    return n + (FLOAT_BYTES * c_out if (bias or folded_bn) else 0)


def packed_layer_bytes(conv: nn.Conv2d, folded_bn: bool = False) -> int:
    """Export bytes of one conv: binary if it is a ``BinaryConv2d``, with or without a folded BN."""
    c_out, c_in_g, kh, kw = conv.weight.shape
    return packed_conv_bytes(c_out, c_in_g, kh, kw, binary=isinstance(conv, BinaryConv2d),
                             bias=conv.bias is not None, folded_bn=folded_bn)


def _own_tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(k, v) for k, v in m._parameters.items() if v is not None]
    out += [(k, v) for k, v in m._buffers.items()
            if v is not None and k not in m._non_persistent_buffers_set and k not in _SKIP_BUFFERS]
    return out


def owned_tensors(model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, torch.Tensor]]]]:
    """``(path, module, own tensors)`` in ``named_modules`` order, each tensor (parameter or persistent
    buffer, not ``num_batches_tracked``) at its first owner: what a size count or a file stores once."""
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


def _accounting(model: nn.Module) -> list[dict[str, Any]]:
    """Per-module byte and parameter counts (modules that own tensors, convs and linears)."""
    pairs = conv_bn_pairs(model)
    folded_bns = {v: k for k, v in pairs.items()}
    rows = []
    for name, m, tensors in owned_tensors(model):
        if not tensors and not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        binary = isinstance(m, BinaryConv2d)
        p1 = m.weight.numel() if binary and any(k == "weight" for k, _ in tensors) else 0
        total = sum(t.numel() for _, t in tensors)
        if isinstance(m, nn.Conv2d):
            layer_keys = {"weight", "bias", "scale"} if binary else {"weight", "bias"}
            extra = sum(t.numel() for k, t in tensors if k not in layer_keys)
            packed = (packed_layer_bytes(m, name in pairs) if any(k == "weight" for k, _ in tensors)
                      else 0) + FLOAT_BYTES * extra
        elif name in folded_bns:
            packed = 0
        else:
            packed = FLOAT_BYTES * total
        rows.append({
            "name": name, "type": type(m).__name__, "binary": binary,
            "mode": m.mode if binary else None,
            "folded_into": folded_bns.get(name), "bn": pairs.get(name),
            "params_1bit": p1, "params_32bit": total - p1,
            "float32_bytes": FLOAT_BYTES * total, "packed_bytes": packed,
        })
    return rows


def packed_model_bytes(model: nn.Module) -> int:
    """Exact bytes the ``.kdbnn`` export holds for the model's tensors (see the module docstring)."""
    return sum(r["packed_bytes"] for r in _accounting(model))


def float32_model_bytes(model: nn.Module) -> int:
    """4 bytes per element of every parameter and persistent buffer (no ``num_batches_tracked``)."""
    return sum(r["float32_bytes"] for r in _accounting(model))


# ----------------------------------------------------------------------------- summary


def _fmt_int(n: int) -> str:
    return f"{n:,}" if n else "0"


@torch.no_grad()
def _trace(model: nn.Module, input_size: tuple[int, int], in_channels: int) -> dict[int, dict]:
    info: dict[int, dict] = {}

    def hook(mod, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        d = info.setdefault(id(mod), {"shape": None, "macs": 0})
        if isinstance(out, torch.Tensor):
            d["shape"] = tuple(out.shape[1:])
            if isinstance(mod, nn.Conv2d):
                c_in_g, kh, kw = mod.weight.shape[1:]
                d["macs"] += out.numel() * c_in_g * kh * kw
            elif isinstance(mod, nn.Linear):
                d["macs"] += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    modes = {id(m): m.training for m in model.modules()}
    try:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        model.eval()
        model(torch.zeros(1, in_channels, *input_size, device=dev, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = modes[id(m)]
    return info


def summary(model: nn.Module, input_size: tuple[int, int], print_fn: Callable[[str], Any] | None = print,
            in_channels: int = 3) -> dict[str, Any]:
    """Print a larq-like per-layer table and return it as a dict (rows + totals).

    Runs one forward (eval mode, no grad, batch 1 of zeros, ``input_size`` = (H, W)) with hooks
    for output shapes and MACs. MACs of a conv: C_out*H_out*W_out * C_in/groups*KH*KW; binary MACs
    are those of ``BinaryConv2d`` layers (BWN: float x ±1; XNOR: xnor-popcount). ``print_fn=None``
    prints nothing.

    Returns:
        {"rows": [...], "totals": {params, params_1bit, params_32bit, float32_bytes, packed_bytes,
        compression, float32_mb, packed_mb, macs, macs_binary, macs_xnor, macs_float,
        binary_mac_fraction, num_binary_layers}, "input_size": [H, W]}.
    """
    info = _trace(model, tuple(input_size), in_channels)
    modules = dict(model.named_modules())
    rows = []
    for r in _accounting(model):
        m = modules[r["name"]]
        t = info.get(id(m), {"shape": None, "macs": 0})
        xnor = r["binary"] and r["mode"] == "xnor"
        has_w = isinstance(getattr(m, "weight", None), torch.Tensor)
        conv = isinstance(m, nn.Conv2d)
        rows.append(dict(
            r,
            float_conv=conv and not r["binary"],
            depthwise=conv and m.groups > 1 and m.groups == m.in_channels,
            input_bits=1 if xnor else 32,
            weight_bits=(1 if r["binary"] else 32) if has_w else None,
            output_shape=list(t["shape"]) if t["shape"] is not None else None,
            macs_float=0 if r["binary"] else t["macs"],
            macs_binary=t["macs"] if r["binary"] else 0,
            macs_xnor=t["macs"] if xnor else 0,
        ))
    tot: dict[str, Any] = {k: sum(r[k] for r in rows) for k in (
        "params_1bit", "params_32bit", "float32_bytes", "packed_bytes", "macs_float", "macs_binary",
        "macs_xnor")}
    tot["params"] = tot["params_1bit"] + tot["params_32bit"]
    tot["macs"] = tot["macs_float"] + tot["macs_binary"]
    tot["compression"] = tot["float32_bytes"] / tot["packed_bytes"] if tot["packed_bytes"] else float("nan")
    tot["float32_mb"] = tot["float32_bytes"] / 2**20
    tot["packed_mb"] = tot["packed_bytes"] / 2**20
    tot["binary_mac_fraction"] = tot["macs_binary"] / tot["macs"] if tot["macs"] else 0.0
    tot["num_binary_layers"] = sum(1 for r in rows if r["binary"])
    # where the packed bytes go: what stays float bounds the compression whatever binarization does
    parts = {"binary": [r for r in rows if r["binary"]],
             "depthwise": [r for r in rows if r["float_conv"] and r["depthwise"]],
             "float_conv": [r for r in rows if r["float_conv"] and not r["depthwise"]]}
    tot["packed_bytes_by_part"] = {k: sum(r["packed_bytes"] for r in v) for k, v in parts.items()}
    tot["packed_bytes_by_part"]["other"] = tot["packed_bytes"] - sum(tot["packed_bytes_by_part"].values())
    tot["layers_by_part"] = {k: len(v) for k, v in parts.items()}
    float_part = tot["packed_bytes"] - tot["packed_bytes_by_part"]["binary"]
    tot["compression_cap"] = tot["float32_bytes"] / float_part if float_part else float("inf")
    result = {"rows": rows, "totals": tot, "input_size": list(input_size)}
    if print_fn is not None:
        print_fn(format_summary(result, title=type(model).__name__))
    return result


def format_summary(result: dict[str, Any], title: str = "model") -> str:
    """The text table of a :func:`summary` result."""
    head = ("Layer", "Type", "In bits", "W bits", "Output", "1-bit params", "32-bit params",
            "Memory KB", "32-bit MACs", "1-bit MACs")
    body = []
    for r in result["rows"]:
        note = f" (folded into {r['folded_into']})" if r["folded_into"] else ""
        body.append((
            (r["name"] or "<root>") + note, r["type"], str(r["input_bits"]),
            "-" if r["weight_bits"] is None else str(r["weight_bits"]),
            "x".join(map(str, r["output_shape"])) if r["output_shape"] else "-",
            _fmt_int(r["params_1bit"]), _fmt_int(r["params_32bit"]),
            f"{r['packed_bytes'] / 1024:.2f}", _fmt_int(r["macs_float"]), _fmt_int(r["macs_binary"]),
        ))
    t = result["totals"]
    total_row = ("Total", "", "", "", "", _fmt_int(t["params_1bit"]), _fmt_int(t["params_32bit"]),
                 f"{t['packed_bytes'] / 1024:.2f}", _fmt_int(t["macs_float"]), _fmt_int(t["macs_binary"]))
    widths = [max(len(x) for x in col) for col in zip(head, *body, total_row)]
    right = {2, 3, 5, 6, 7, 8, 9}

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    h, w = result["input_size"]
    out = [f"{title} summary (input {h}x{w})", sep, line(head), sep]
    out += [line(b) for b in body]
    out += [sep, line(total_row), sep]
    out.append(f"Total params: {t['params']:,} ({t['params_1bit']:,} 1-bit, {t['params_32bit']:,} 32-bit)")
    out.append(f"Float32 size: {t['float32_bytes']:,} B ({t['float32_mb']:.2f} MB)")
    out.append(f"Packed size:  {t['packed_bytes']:,} B ({t['packed_mb']:.2f} MB)")
    out.append(f"Compression:  {t['compression']:.1f}x")
    out.append(f"MACs: {t['macs']:,} total, {100 * t['binary_mac_fraction']:.1f}% binary "
               f"({t['macs_xnor']:,} xnor)")
    by, n = t.get("packed_bytes_by_part"), t.get("layers_by_part")
    if by and t["packed_bytes"]:
        def pct(k: str) -> str:
            return f"{100 * by[k] / t['packed_bytes']:.1f}%"

        out.append(f"Packed bytes: {pct('binary')} in {n['binary']} binary convs, {pct('float_conv')} in "
                   f"{n['float_conv']} float convs, {pct('depthwise')} in {n['depthwise']} depthwise convs "
                   f"(kept float: the packed kernels are dense), {pct('other')} other (BN, biases, ...)")
        out.append(f"Float parts alone cap the compression at {t['compression_cap']:.1f}x "
                   "(what stays float - first/prediction/depthwise convs - is 32x larger per weight)")
    return "\n".join(out)
