"""Turn a float model into a binary student: swap ``nn.Conv2d`` for ``BinaryConv2d`` by policy.

Rules (applied in this order to every conv, in module registration order):

1. already a ``BinaryConv2d`` -> left as is ("already binary"; converting twice is a no-op);
2. not a ``nn.Conv2d`` (ConvTranspose2d, Conv1d, ...) -> kept float ("<Type> unsupported");
3. not matched by ``include`` -> "not included by policy"; matched by ``exclude`` -> "excluded by policy";
4. ``keep_first`` and it is the first conv -> "first conv". The first conv is the first
   ``nn.Conv2d`` in module registration order (the conv that reads the image in every family
   this toolkit builds);
5. ``keep_last`` and it is a prediction conv -> "prediction conv". Prediction convs are the paths
   returned by ``model.prediction_convs()`` (the `Detector` hook; every family defines it), else
   the last ``nn.Conv2d`` in registration order;
6. a conv the model's ``fixed_convs()`` hook names (e.g. Ultralytics' DFL conv, fixed weights)
   -> the reason it gives;
7. ``keep_depthwise`` and depthwise (groups == in_channels > 1) -> "depthwise";
8. ``keep_pointwise`` and a 1x1 conv -> "1x1 (keep_pointwise)"; ``keep_strided`` and stride > 1
   -> "stride N (keep_strided)" (binary 1x1 and binary downsampling convs cost accuracy most:
   Bi-Real Net, Liu et al. 2018; ReActNet, Liu et al. 2020; unless named exactly);
9. groups != 1 -> "groups unsupported" (the packed kernels of ``kd_bnn.deploy`` are dense; a
   depthwise conv with ``keep_depthwise: false`` lands here too);
10. a padding mode other than zeros -> "padding_mode '<m>' unsupported" (the kernel pads with
   constants only);
11. otherwise converted.

A pattern "names" a conv, overriding rules 4 and 5, when an ``include`` entry is the conv's
path (or one of its ancestors' paths) written out exactly, without wildcards. Patterns are
``fnmatch`` globs or ``re:``-prefixed regexes (full match) tried against the conv's path and
every ancestor path, so ``model.22`` covers ``model.22.cv2.0.0.conv``. A pattern that matches no
conv is an error listing close matches.

Staged binarization (Xu et al. 2019: M0 -> M1 -> M2): ``policy.stages`` lists layer groups and
the epoch each starts; a BinaryConv2d takes the first stage that matches it, layers matched by no
stage start at epoch 0. :func:`apply_stages` sets ``enabled`` (False = runs as the float conv).
``enabled`` is not saved in the state dict: call ``apply_stages`` again after loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from torch import nn

from kd_bnn.binary.blocks import apply_blocks, block_spec_for, blocks_of
from kd_bnn.binary.layers import BinaryConv2d, binary_convs, is_depthwise
from kd_bnn.binary.quantizers import INPUT_SCALINGS, build_quantizer, weight_scaling
from kd_bnn.config import BinaryConfig, ConfigError

PolicyLike = BinaryConfig | Mapping[str, Any] | None


# ----------------------------------------------------------------------------- policy


def as_policy(policy: Any = None) -> BinaryConfig:
    """Coerce None / BinaryConfig / dict / dataclass into a validated :class:`BinaryConfig`.

    Raises:
        ConfigError: unknown key (with the valid keys), bad value, clip <= 0, pad_value not ±1,
            unknown quantizer name (with the registered ones).
    """
    if policy is None:
        cfg = BinaryConfig()
    elif isinstance(policy, BinaryConfig):
        cfg = policy
    else:
        if dataclasses.is_dataclass(policy) and not isinstance(policy, type):
            policy = dataclasses.asdict(policy)
        if not isinstance(policy, Mapping):
            raise TypeError(f"binary policy must be a BinaryConfig, a dict or None, found {type(policy).__name__}")
        try:
            cfg = BinaryConfig.model_validate(dict(policy))
        except ValidationError as exc:
            valid = sorted(BinaryConfig.model_fields)
            lines = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    lines.append(f"unknown key '{key}'{hint}; valid keys: {', '.join(valid)}")
                else:
                    lines.append(f"key '{key}': {err['msg']} (found {err.get('input')!r})")
            raise ConfigError("binary policy:\n  " + "\n  ".join(lines)) from None
    if not cfg.clip > 0:
        raise ConfigError(f"binary policy key 'clip': must be > 0, found {cfg.clip}")
    if cfg.pad_value not in (1.0, -1.0):
        raise ConfigError(f"binary policy key 'pad_value': must be +1 or -1, found {cfg.pad_value}")
    for key in ("weight_quantizer", "input_quantizer"):
        try:
            build_quantizer(getattr(cfg, key), cfg.clip)
        except ValueError as exc:
            raise ConfigError(f"binary policy key '{key}': {exc}") from None
    try:
        weight_scaling(cfg.weight_scaling)
    except ValueError as exc:
        raise ConfigError(f"binary policy key 'weight_scaling': {exc}") from None
    if cfg.input_scaling not in INPUT_SCALINGS:
        raise ConfigError(f"binary policy key 'input_scaling': expected one of {', '.join(INPUT_SCALINGS)}, "
                          f"found {cfg.input_scaling!r}")
    for i, st in enumerate(cfg.stages):
        if st.epoch < 0:
            raise ConfigError(f"binary policy key 'stages.{i}.epoch': must be >= 0, found {st.epoch}")
    return cfg


def layer_options(policy: PolicyLike = None) -> dict[str, Any]:
    """Keyword arguments for :class:`BinaryConv2d` taken from a policy."""
    cfg = as_policy(policy)
    return dict(mode=cfg.mode, weight_quantizer=cfg.weight_quantizer,
                input_quantizer=cfg.input_quantizer, clip=cfg.clip,
                weight_scaling=cfg.weight_scaling,
                input_scaling=cfg.input_scaling if cfg.mode == "xnor" else "none",
                pad_value=cfg.pad_value)


# ----------------------------------------------------------------------------- patterns

_GLOB_CHARS = set("*?[]")


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else [""]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def pattern_matches(pattern: str, path: str) -> bool:
    """True when a glob or ``re:`` regex matches the module path or one of its ancestors' paths."""
    cands = _ancestors(path)
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.fullmatch(c) for c in cands)
    return any(fnmatch.fnmatchcase(c, pattern) for c in cands)


def _names_exactly(pattern: str, path: str) -> bool:
    return not pattern.startswith("re:") and not (_GLOB_CHARS & set(pattern)) and pattern in _ancestors(path)


def _check_patterns(key: str, patterns: list[str], conv_paths: list[str]) -> None:
    for i, pat in enumerate(patterns):
        if pat == "*":
            continue
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as exc:
                raise ConfigError(f"binary policy key '{key}[{i}]': bad regex {pat[3:]!r}: {exc}") from None
        if any(pattern_matches(pat, p) for p in conv_paths):
            continue
        names = sorted({a for p in conv_paths for a in _ancestors(p)})
        stripped = pat[3:] if pat.startswith("re:") else pat
        stripped = "".join(ch for ch in stripped if ch not in _GLOB_CHARS and ch not in "\\^$+(){}|")
        close = difflib.get_close_matches(stripped, names, n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else (
            f"conv layers are e.g.: {', '.join(conv_paths[:5])}" if conv_paths else "the model has no conv layer")
        raise ConfigError(f"binary policy key '{key}[{i}]': pattern {pat!r} matches no conv layer; {hint}")


# ----------------------------------------------------------------------------- special convs


def first_conv_path(model: nn.Module) -> str | None:
    """Path of the first ``nn.Conv2d`` in module registration order (the conv fed by the image)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    return None


def prediction_conv_paths(model: nn.Module) -> list[str]:
    """Paths of the convs whose outputs feed the detection head (see module docstring, rule 5)."""
    modules = dict(model.named_modules())
    fn = getattr(model, "prediction_convs", None)
    if callable(fn):
        paths = list(fn())
        for p in paths:
            if not isinstance(modules.get(p), nn.Conv2d):
                raise ValueError(f"{type(model).__name__}.prediction_convs() returned {p!r}, "
                                 f"which is not a Conv2d module path of the model")
        return paths
    last = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    return last[-1:]


def fixed_conv_paths(model: nn.Module) -> dict[str, str]:
    """Convs the model says must stay float whatever the policy, with the reason (rule 6)."""
    fn = getattr(model, "fixed_convs", None)
    return dict(fn()) if callable(fn) else {}


# ----------------------------------------------------------------------------- report


@dataclass
class ConvRow:
    """One conv of the model and what conversion did with it."""

    path: str
    type: str
    shape: tuple[int, ...]
    groups: int
    converted: bool
    reason: str
    stage: str | None = None
    epoch: int | None = None
    block: str = "-"  # the block options applied (kd_bnn.binary.blocks), and why any could not be

    @property
    def params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class ConversionReport:
    """Every conv of the model, binary or not, and why (so no one wonders why a model did not shrink)."""

    rows: list[ConvRow] = field(default_factory=list)
    mode: str = "bwn"

    @property
    def converted(self) -> list[str]:
        return [r.path for r in self.rows if r.converted]

    @property
    def kept_float(self) -> list[str]:
        return [r.path for r in self.rows if not r.converted]

    def binary_param_fraction(self) -> float:
        total = sum(r.params for r in self.rows)
        return sum(r.params for r in self.rows if r.converted) / total if total else 0.0

    def table(self) -> str:
        head = ("layer", "type", "weight shape", "groups", "binary", "stage", "reason", "block")
        body = [(r.path, r.type, "x".join(map(str, r.shape)), str(r.groups),
                 "yes" if r.converted else "no",
                 "-" if r.stage is None else f"{r.stage}@{r.epoch}", r.reason, r.block) for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*b) for b in body]
        lines.append(f"{len(self.converted)} of {len(self.rows)} convs binary ({self.mode}), "
                     f"{100 * self.binary_param_fraction():.1f}% of conv weights")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "num_convs": len(self.rows),
            "num_binary": len(self.converted),
            "binary_param_fraction": self.binary_param_fraction(),
            "rows": [dict(dataclasses.asdict(r), shape=list(r.shape)) for r in self.rows],
        }

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------- conversion


def _conv_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _replace_modules(model: nn.Module, mapping: dict[int, nn.Module]) -> None:
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in mapping:
                parent._modules[name] = mapping[id(child)]


def binarize(model: nn.Module, policy: PolicyLike = None) -> tuple[nn.Module, ConversionReport]:
    """Swap the model's ``nn.Conv2d`` modules for ``BinaryConv2d`` in place, as the policy says.

    Args:
        model: the float model (deep-copy a teacher first: it is modified in place; if ``model``
            itself is a single conv, the returned module is a new one).
        policy: a :class:`~kd_bnn.config.BinaryConfig`, a dict shaped like the YAML ``binary:``
            section, or None (BWN, ``mean_abs``, first/prediction/depthwise convs kept float).

    Returns:
        (model, report) with one report row per conv (see the module docstring for the rules).
    """
    cfg = as_policy(policy)
    opts = layer_options(cfg)
    named = dict(model.named_modules())
    conv_paths = _conv_paths(model)
    _check_patterns("include", cfg.include, conv_paths)
    _check_patterns("exclude", cfg.exclude, conv_paths)
    for i, st in enumerate(cfg.stages):
        _check_patterns(f"stages.{i}.layers", st.layers, conv_paths)
    first = first_conv_path(model)
    preds = set(prediction_conv_paths(model))
    fixed = fixed_conv_paths(model)

    rows: list[ConvRow] = []
    mapping: dict[int, nn.Module] = {}
    for path in conv_paths:
        m = named[path]
        named_exactly = any(_names_exactly(p, path) for p in cfg.include)
        if isinstance(m, BinaryConv2d):
            reason = "already binary"
        elif not isinstance(m, nn.Conv2d):
            reason = f"{type(m).__name__} unsupported"
        elif not any(pattern_matches(p, path) for p in cfg.include):
            reason = "not included by policy"
        elif any(pattern_matches(p, path) for p in cfg.exclude):
            reason = "excluded by policy"
        elif cfg.keep_first and path == first and not named_exactly:
            reason = "first conv"
        elif cfg.keep_last and path in preds and not named_exactly:
            reason = "prediction conv"
        elif path in fixed:
            reason = fixed[path]
        elif cfg.keep_depthwise and is_depthwise(m):
            reason = "depthwise"
        elif cfg.keep_pointwise and tuple(m.kernel_size) == (1, 1) and not named_exactly:
            reason = "1x1 (keep_pointwise)"
        elif cfg.keep_strided and max(m.stride) > 1 and not named_exactly:
            reason = f"stride {max(m.stride)} (keep_strided)"
        elif m.groups != 1:
            reason = "groups unsupported"
        elif m.padding_mode != "zeros":
            reason = f"padding_mode {m.padding_mode!r} unsupported"
        else:
            reason = "converted"
            if id(m) not in mapping:
                mapping[id(m)] = BinaryConv2d.from_conv(m, **opts)
        w = m.weight
        rows.append(ConvRow(path, type(m).__name__, tuple(w.shape), int(m.groups),
                            reason in ("converted", "already binary"), reason))
    if mapping:
        if id(model) in mapping:
            model = mapping[id(model)]
        else:
            _replace_modules(model, mapping)
    _apply_block_options(model, cfg, rows)
    epochs = {}
    for g in stage_groups(model, cfg):
        for p in g.paths:
            epochs[p] = (g.name, g.epoch)
    for r in rows:
        at = r.path if r.path in epochs else f"{r.path}.conv"  # a conv wrapped in a BinaryBlock
        if r.converted and at in epochs:
            r.stage, r.epoch = epochs[at]
    apply_stages(model, cfg, 0)
    return model, ConversionReport(rows, cfg.mode)


def _apply_block_options(model: nn.Module, cfg: BinaryConfig, rows: list[ConvRow]) -> None:
    """The ``block`` options on every conv converted now; each row says what applied and why not."""
    b = cfg.block
    if not (b.shortcut or b.rsign or b.rprelu):
        return
    specs = {}
    blocks = blocks_of(model)
    for r in rows:
        if r.reason != "converted":
            continue
        spec, why = block_spec_for(model, r.path, model.get_submodule(r.path), cfg.mode, b.shortcut, b.rsign,
                                   b.rprelu, blocks)
        r.block = "; ".join(([spec.describe()] if spec else []) + [f"not applied: {w}" for w in why]) or "-"
        if spec is not None:
            specs[r.path] = spec
    apply_blocks(model, specs)


# ----------------------------------------------------------------------------- stages


@dataclass
class StageGroup:
    """The BinaryConv2d layers that start running binary at ``epoch``."""

    name: str
    epoch: int
    paths: list[str]


def stage_groups(model: nn.Module, policy: PolicyLike = None) -> list[StageGroup]:
    """Group the model's BinaryConv2d layers by policy stage.

    One group per policy stage (``stage0``, ``stage1``, ... in policy order; a layer goes to the
    first stage that matches it) plus ``unstaged`` (epoch 0) for layers no stage names.
    """
    cfg = as_policy(policy)
    bins = list(binary_convs(model))
    for i, st in enumerate(cfg.stages):
        _check_patterns(f"stages.{i}.layers", st.layers, _conv_paths(model))
    groups = [StageGroup(f"stage{i}", st.epoch, []) for i, st in enumerate(cfg.stages)]
    rest = []
    for path in bins:
        for i, st in enumerate(cfg.stages):
            if any(pattern_matches(p, path) for p in st.layers):
                groups[i].paths.append(path)
                break
        else:
            rest.append(path)
    if rest:
        groups.append(StageGroup("unstaged", 0, rest))
    return groups


def apply_stages(model: nn.Module, policy: PolicyLike, epoch: int) -> list[str]:
    """Enable the BinaryConv2d layers whose stage has started by ``epoch`` (others run float).

    Returns the paths of the layers that run binary at this epoch.
    """
    bins = binary_convs(model)
    enabled = []
    for g in stage_groups(model, policy):
        for p in g.paths:
            bins[p].enabled = epoch >= g.epoch
            if bins[p].enabled:
                enabled.append(p)
    return enabled
