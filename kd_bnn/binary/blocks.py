"""Binary block options: a real-valued shortcut, RSign and RPReLU around a binary conv of any family.

A plain binary copy of a float detector loses most of its accuracy when activations are binary
too (XNOR). What closes most of the gap in the literature is structural, and is applied here to
every converted conv that sits in a ``conv -> BatchNorm -> activation`` block (the family's
`Detector.activation_blocks` hook):

    y = act( BN( bconv( sign(x + b) ) ) + S(x) )

- **real-valued shortcut** ``S`` (Bi-Real Net, Liu et al., ECCV 2018; ReActNet, Liu et al., ECCV
  2020): the block's float input carried around the binary conv, with the BN before the add.
  ``S`` has no parameters: identity when shapes match; for a stride-s conv an ``s x s`` average
  pool (Bi-Real's downsampling shortcut, without its float 1x1 conv); when the conv widens the
  channels, output channel ``c`` carries input channel ``c mod C_in`` (ReActNet duplicates
  channels when it doubles them); when it narrows them, output channel ``c`` is the mean of
  input channels ``j`` with ``j mod C_out == c``.
- **RSign** (ReActNet): a learnable per-channel shift ``b`` before the sign (xnor mode only; a
  BWN conv has no activation sign);
- **RPReLU** (ReActNet): the block's activation becomes ``PReLU(z - gamma) + zeta`` with
  per-channel ``gamma``, ``zeta`` (init 0) and slopes initialised from the activation it replaces
  (leaky 0.1, ReLU 0, linear 1), so a model starts as the function it had.

:func:`apply_blocks` rewrites the module tree: the conv's path then holds a :class:`BinaryBlock`
(``move``, ``conv``, ``bn``, ``shortcut``; the BatchNorm moves into it, its old place becomes an
``nn.Identity``), and the activation's path holds an :class:`RPReLU`. The rewrite is a function of
the conv paths and the :class:`BlockSpec` of each, so the exporter records the specs as plain data
and the runtime re-applies them to the rebuilt skeleton (docs/architecture.md, "The .kdbnn file").
A block option that cannot apply to a conv is returned with its reason, never skipped silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SHORTCUTS", "BinaryBlock", "BlockSpec", "ChannelShortcut", "LearnableBias", "RPReLU",
           "activation_slope", "apply_blocks", "block_spec_for", "block_specs_of", "blocks_of",
           "check_block_specs", "map_channels"]

#: Shortcut kinds: "none", or a parameter-free real-valued path (see the module docstring).
SHORTCUTS = ("none", "identity", "repeat", "fold")


class LearnableBias(nn.Module):
    """``x + b`` with a per-channel ``b`` (init 0): RSign's threshold (ReActNet, Liu et al. 2020)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, 1, 1)


class RPReLU(nn.Module):
    """``PReLU(x - gamma) + zeta`` with per-channel ``gamma``, ``zeta`` and slopes (ReActNet)."""

    def __init__(self, channels: int, slope: float = 0.25):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), float(slope)))
        self.zeta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = (-1, 1, 1)
        x = x - self.gamma.view(v)
        return torch.where(x >= 0, x, x * self.slope.view(v)) + self.zeta.view(v)


class ChannelShortcut(nn.Module):
    """The parameter-free real-valued shortcut of a binary block (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.kind = shortcut_kind(self.in_channels, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True, count_include_pad=False)
        return map_channels(x, self.out_channels)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kind={self.kind}"


def map_channels(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The shortcut's channel map of ``x`` (N, C, H, W) to ``out_channels``: identity, repeat
    (channel ``c`` <- ``c mod C``) or fold (mean of channels ``j`` with ``j mod out_channels == c``)."""
    c_in = x.shape[1]
    kind = shortcut_kind(c_in, out_channels)
    if kind == "repeat":
        return x.repeat(1, -(-out_channels // c_in), 1, 1)[:, :out_channels]
    if kind == "fold":
        k = -(-c_in // out_channels)
        n, _, h, w = x.shape
        pad = k * out_channels - c_in
        total = F.pad(x, (0, 0, 0, 0, 0, pad)).view(n, k, out_channels, h, w).sum(1)
        counts = torch.full((out_channels,), float(k), dtype=x.dtype, device=x.device)
        if pad:
            counts[out_channels - pad:] -= 1
        return total / counts.view(1, -1, 1, 1)
    return x


def shortcut_kind(c_in: int, c_out: int) -> str:
    """``identity`` (same width), ``repeat`` (widening) or ``fold`` (narrowing)."""
    return "identity" if c_in == c_out else ("repeat" if c_out > c_in else "fold")


class BinaryBlock(nn.Module):
    """``bn(conv(move(x))) + shortcut(x)``: a binary conv with RSign and a real-valued shortcut.

    ``move`` and ``shortcut`` are ``nn.Identity`` / None when the spec leaves them out (a block
    without a shortcut returns ``bn(conv(move(x)))``). The BN is the one the conv had after it."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, move: bool, shortcut: bool):
        super().__init__()
        self.move = LearnableBias(conv.in_channels) if move else nn.Identity()
        self.conv = conv
        self.bn = bn
        self.shortcut = ChannelShortcut(conv.in_channels, conv.out_channels, conv.stride[0]) if shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.move(x)))
        if self.shortcut is not None:
            s = self.shortcut(x)
            if s.shape != y.shape:
                raise RuntimeError(f"binary block shortcut: shape {tuple(s.shape)} does not match the conv "
                                   f"output {tuple(y.shape)}")
            y = y + s
        return y


@dataclass(frozen=True)
class BlockSpec:
    """What :func:`apply_blocks` does to one conv (plain data, stored in the ``.kdbnn``)."""

    shortcut: str = "none"  # one of SHORTCUTS
    rsign: bool = False
    rprelu: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"shortcut {self.shortcut}"] if self.shortcut != "none" else []
        parts += ["rsign"] * self.rsign + ["rprelu"] * self.rprelu
        return "+".join(parts) or "-"


def activation_slope(act: nn.Module) -> float | None:
    """The PReLU slope that equals ``act`` (LeakyReLU: its slope, ReLU 0, Identity 1), else None."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.ReLU):
        return 0.0
    if isinstance(act, nn.Identity):
        return 1.0
    return None


def blocks_of(model: nn.Module) -> dict[str, tuple[str | None, str]]:
    """conv path -> (bn path or None, act path) of the model's ``activation_blocks`` hook."""
    hook = getattr(model, "activation_blocks", None)
    return {c: (b, a) for c, b, a in (hook() if callable(hook) else [])}


def block_spec_for(model: nn.Module, path: str, conv: nn.Conv2d, mode: str, shortcut: bool, rsign: bool,
                   rprelu: bool, blocks: dict[str, tuple[str | None, str]] | None = None
                   ) -> tuple[BlockSpec | None, list[str]]:
    """The spec the options give ``conv`` at ``path``, and why any asked-for option cannot apply.

    ``(None, reasons)`` when nothing applies. Reasons name the option and the cause (no
    ``conv -> BN -> act`` block known for the conv, no BatchNorm, grouped conv, an activation
    RPReLU cannot start from, a stride whose pooled shortcut would not match the conv output)."""
    if not (shortcut or rsign or rprelu):
        return None, []
    blocks = blocks_of(model) if blocks is None else blocks
    if path not in blocks:
        return None, ["block options: the family names no conv -> bn -> act block for this conv"]
    bn_path, act_path = blocks[path]
    reasons: list[str] = []
    kind = "none"
    if shortcut:
        if bn_path is None:
            reasons.append("shortcut: no BatchNorm after the conv")
        elif conv.groups != 1:
            reasons.append(f"shortcut: groups={conv.groups}")
        elif not _pool_matches(conv):
            reasons.append(f"shortcut: stride {tuple(conv.stride)} / padding do not give the pooled input's size")
        else:
            kind = shortcut_kind(conv.in_channels, conv.out_channels)
    if rsign and mode != "xnor":
        reasons.append("rsign: a bwn conv has no activation sign")
        rsign = False
    if rprelu and activation_slope(model.get_submodule(act_path)) is None:
        reasons.append(f"rprelu: cannot start from activation {type(model.get_submodule(act_path)).__name__}")
        rprelu = False
    spec = BlockSpec(kind, bool(rsign), bool(rprelu))
    return (spec if spec != BlockSpec() else None), reasons


def _pool_matches(conv: nn.Conv2d) -> bool:
    """A ceil-mode ``s x s`` average pool of the input has the conv's output size for every input size."""
    if conv.stride[0] != conv.stride[1] or conv.dilation != (1, 1) or isinstance(conv.padding, str):
        return conv.stride == (1, 1) and conv.padding == "same"
    s = conv.stride[0]
    for k, p in zip(conv.kernel_size, conv.padding):
        # out = floor((h + 2p - k) / s) + 1 must equal ceil(h / s) for all h
        if not all((h + 2 * p - k) // s + 1 == -(-h // s) for h in range(k, k + 4 * s)):
            return False
    return True


def check_block_specs(model: nn.Module, specs: Any, where: str) -> dict[str, BlockSpec]:
    """Validate ``{conv path: {shortcut, rsign, rprelu}}`` read from a file against ``model``.

    Raises ``ValueError`` naming ``where`` and the key for anything but plain values of the
    known keys on a conv that sits in one of the model's ``conv -> bn -> act`` blocks."""
    if not isinstance(specs, dict):
        raise ValueError(f"{where}: expected a mapping of conv path -> block options, found {type(specs).__name__}")
    blocks = blocks_of(model)
    out: dict[str, BlockSpec] = {}
    for path, spec in specs.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{where}[{path!r}]: expected a mapping, found {type(spec).__name__}")
        extra = sorted(set(spec) - {"shortcut", "rsign", "rprelu"})
        if extra:
            raise ValueError(f"{where}[{path!r}]: unknown keys {extra}; allowed: ['rprelu', 'rsign', 'shortcut']")
        if spec.get("shortcut", "none") not in SHORTCUTS:
            raise ValueError(f"{where}[{path!r}].shortcut: expected one of {SHORTCUTS}, found {spec.get('shortcut')!r}")
        for key in ("rsign", "rprelu"):
            if not isinstance(spec.get(key, False), bool):
                raise ValueError(f"{where}[{path!r}].{key}: expected true/false, found {spec.get(key)!r}")
        if path not in blocks:
            raise ValueError(f"{where}: {path!r} is not a conv of a conv -> bn -> act block of the model")
        conv = model.get_submodule(path)
        s = BlockSpec(spec.get("shortcut", "none"), spec.get("rsign", False), spec.get("rprelu", False))
        if s.shortcut != "none" and (blocks[path][0] is None or s.shortcut != shortcut_kind(conv.in_channels, conv.out_channels)
                                     or not _pool_matches(conv)):
            raise ValueError(f"{where}[{path!r}].shortcut: {s.shortcut!r} does not fit the conv "
                             f"({conv.in_channels} -> {conv.out_channels}, stride {tuple(conv.stride)})")
        if s.rprelu and activation_slope(model.get_submodule(blocks[path][1])) is None:
            raise ValueError(f"{where}[{path!r}].rprelu: the block's activation cannot become RPReLU")
        out[path] = s
    return out


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    holder._modules[name] = new


def apply_blocks(model: nn.Module, specs: dict[str, BlockSpec]) -> None:
    """Rewrite each conv of ``specs`` (paths of the model before the rewrite) into its block, in place.

    The conv's BatchNorm moves into the :class:`BinaryBlock` (its old path holds ``nn.Identity``)
    when the spec has a shortcut or RSign; the activation becomes :class:`RPReLU` when asked."""
    blocks = blocks_of(model)
    for path, spec in specs.items():
        bn_path, act_path = blocks[path]
        conv = model.get_submodule(path)
        ref = conv.weight
        if spec.shortcut != "none" or spec.rsign:
            bn = model.get_submodule(bn_path) if bn_path else nn.Identity()
            block = BinaryBlock(conv, bn, spec.rsign, spec.shortcut != "none").to(ref.device)
            block.train(conv.training)
            _set(model, path, block)
            if bn_path:
                _set(model, bn_path, nn.Identity())
        if spec.rprelu:
            act = model.get_submodule(act_path)
            new = RPReLU(conv.out_channels, activation_slope(act)).to(ref.device)
            new.train(act.training)
            _set(model, act_path, new)


def block_specs_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`apply_blocks`: ``{conv path: spec dict}`` for every block of the model
    that has one (what the exporter writes as metadata ``blocks``)."""
    out: dict[str, dict[str, Any]] = {}
    for conv_path, (_, act_path) in blocks_of(model).items():
        m = model.get_submodule(conv_path)
        block = m if isinstance(m, BinaryBlock) else None
        spec = BlockSpec("none" if block is None or block.shortcut is None else block.shortcut.kind,
                         block is not None and isinstance(block.move, LearnableBias),
                         isinstance(model.get_submodule(act_path), RPReLU))
        if spec != BlockSpec() or block is not None:
            out[conv_path] = spec.to_dict()
    return out
