"""Darknet ``.cfg`` files: parse into line-numbered sections, validate keys and values, format back.

The format is Darknet's INI-like text (Redmon, "Darknet: Open source neural networks in C",
2013-2016): ``[section]`` headers, ``key=value`` lines, ``#``/``;`` comments. The first section
is ``[net]`` (or ``[network]``) with the input size; every later section is one layer, numbered
from 0 in file order (the numbering that ``[route] layers=`` and ``[shortcut] from=`` use).

Every key of every supported section is listed in :data:`SECTION_KEYS` with its value type, so an
unknown section, an unknown key or a value that does not parse is reported with the file and line.
Training-only keys of ``[net]``/``[region]``/``[yolo]`` are accepted and kept, but not used by
the PyTorch model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ACTIVATIONS",
    "CfgError",
    "SECTION_KEYS",
    "Section",
    "format_cfg",
    "parse_cfg",
    "parse_cfg_text",
]

#: Activations of ``[convolutional]`` and ``[shortcut]`` that the model implements.
ACTIVATIONS = ("linear", "leaky", "relu", "logistic", "mish", "swish")

_INT, _FLOAT, _STR, _INTS, _FLOATS = "int", "float", "str", "ints", "floats"

_NET_KEYS = {
    "width": _INT, "height": _INT, "channels": _INT, "batch": _INT, "subdivisions": _INT,
    "momentum": _FLOAT, "decay": _FLOAT, "angle": _FLOAT, "saturation": _FLOAT,
    "exposure": _FLOAT, "hue": _FLOAT, "learning_rate": _FLOAT, "burn_in": _INT,
    "max_batches": _INT, "policy": _STR, "steps": _FLOATS, "scales": _FLOATS, "step": _INT,
    "scale": _FLOAT, "power": _FLOAT, "gamma": _FLOAT, "jitter": _FLOAT, "flip": _INT,
    "mosaic": _INT, "mixup": _INT, "cutmix": _INT, "blur": _INT, "letter_box": _INT,
    "min_crop": _INT, "max_crop": _INT, "aspect": _FLOAT, "max_chart_loss": _FLOAT,
    "adam": _INT, "B1": _FLOAT, "B2": _FLOAT, "eps": _FLOAT, "inputs": _INT,
    "max_crop_aspect": _FLOAT,
}

#: section name -> {key: value type}. The value types are 'int', 'float', 'str', 'ints' and
#: 'floats' (comma-separated lists).
SECTION_KEYS: dict[str, dict[str, str]] = {
    "net": _NET_KEYS,
    "convolutional": {
        "batch_normalize": _INT, "filters": _INT, "size": _INT, "stride": _INT, "pad": _INT,
        "padding": _INT, "groups": _INT, "activation": _STR, "binary": _INT, "xnor": _INT,
    },
    "maxpool": {"size": _INT, "stride": _INT, "padding": _INT},
    "avgpool": {},
    "route": {"layers": _INTS, "groups": _INT, "group_id": _INT},
    "reorg": {"stride": _INT, "reverse": _INT},
    "shortcut": {"from": _INT, "activation": _STR},
    "upsample": {"stride": _INT, "scale": _FLOAT},
    "dropout": {"probability": _FLOAT},
    "region": {
        "anchors": _FLOATS, "bias_match": _INT, "classes": _INT, "coords": _INT, "num": _INT,
        "softmax": _INT, "jitter": _FLOAT, "rescore": _INT, "object_scale": _FLOAT,
        "noobject_scale": _FLOAT, "class_scale": _FLOAT, "coord_scale": _FLOAT,
        "absolute": _INT, "thresh": _FLOAT, "random": _INT, "max": _INT,
    },
    "yolo": {
        "mask": _INTS, "anchors": _FLOATS, "classes": _INT, "num": _INT, "jitter": _FLOAT,
        "ignore_thresh": _FLOAT, "truth_thresh": _FLOAT, "random": _INT, "scale_x_y": _FLOAT,
        "iou_thresh": _FLOAT, "iou_normalizer": _FLOAT, "cls_normalizer": _FLOAT,
        "obj_normalizer": _FLOAT, "iou_loss": _STR, "nms_kind": _STR, "beta_nms": _FLOAT,
        "max_delta": _FLOAT, "resize": _FLOAT, "max": _INT, "label_smooth_eps": _FLOAT,
    },
}

_ALIASES = {"network": "net", "conv": "convolutional"}


class CfgError(ValueError):
    """A Darknet cfg that cannot be used; the message names the file and line."""


@dataclass
class Section:
    """One ``[type]`` block of a cfg.

    Attributes:
        type: canonical section name (``"net"``, ``"convolutional"``, ...).
        line: 1-based line number of the ``[type]`` header.
        options: key -> raw string value, in file order.
        key_lines: key -> 1-based line number of that key.
        source: the file the section came from (for messages).
    """

    type: str
    line: int
    options: dict[str, str] = field(default_factory=dict)
    key_lines: dict[str, int] = field(default_factory=dict)
    source: str = "<cfg>"

    def where(self, key: str | None = None) -> str:
        """``file:line`` of the section header, or of ``key`` when it is set."""
        line = self.key_lines.get(key, self.line) if key else self.line
        return f"{self.source}:{line}"

    def error(self, message: str, key: str | None = None) -> CfgError:
        """A :class:`CfgError` located at this section (or its ``key``)."""
        return CfgError(f"{self.where(key)}: [{self.type}] {message}")

    def _typed(self, key: str, kind: str, default):
        if key not in self.options:
            return default
        return _convert(self.options[key], kind, self, key)

    def get_int(self, key: str, default: int | None = None) -> int | None:
        return self._typed(key, _INT, default)

    def get_float(self, key: str, default: float | None = None) -> float | None:
        return self._typed(key, _FLOAT, default)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self._typed(key, _STR, default)

    def get_ints(self, key: str, default: list[int] | None = None) -> list[int] | None:
        return self._typed(key, _INTS, default)

    def get_floats(self, key: str, default: list[float] | None = None) -> list[float] | None:
        return self._typed(key, _FLOATS, default)

    def require(self, key: str) -> None:
        """Raise when ``key`` is missing."""
        if key not in self.options:
            raise self.error(f"missing required key {key!r}")


def _convert(raw: str, kind: str, section: Section, key: str):
    def bad(expected: str) -> CfgError:
        return section.error(f"key {key!r}: expected {expected}, found {raw!r}", key)

    try:
        if kind == _INT:
            return int(raw)
        if kind == _FLOAT:
            return float(raw)
        if kind == _STR:
            if not raw:
                raise ValueError
            return raw
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        if not parts:
            raise ValueError
        if kind == _INTS:
            return [int(p) for p in parts]
        return [float(p) for p in parts]
    except ValueError:
        expected = {
            _INT: "an integer", _FLOAT: "a number", _STR: "a non-empty string",
            _INTS: "a comma-separated list of integers", _FLOATS: "a comma-separated list of numbers",
        }[kind]
        raise bad(expected) from None


def parse_cfg_text(text: str, source: str = "<cfg>") -> list[Section]:
    """Parse cfg text into sections; see :func:`parse_cfg`."""
    sections: list[Section] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise CfgError(f"{source}:{lineno}: section header {line!r} lacks a closing ']'")
            name = line[1:-1].strip().lower()
            name = _ALIASES.get(name, name)
            if name not in SECTION_KEYS:
                raise CfgError(
                    f"{source}:{lineno}: unknown section [{name}]; supported: "
                    + ", ".join(f"[{s}]" for s in SECTION_KEYS)
                )
            if name == "net" and sections:
                raise CfgError(f"{source}:{lineno}: [net] must be the first section, found it "
                               f"after {len(sections)} section(s)")
            if name != "net" and not sections:
                raise CfgError(f"{source}:{lineno}: the first section must be [net], found [{name}]")
            sections.append(Section(type=name, line=lineno, source=source))
            continue
        if "=" not in line:
            raise CfgError(f"{source}:{lineno}: expected 'key=value' or '[section]', found {line!r}")
        if not sections:
            raise CfgError(f"{source}:{lineno}: option {line!r} before the first section")
        key, value = (s.strip() for s in line.split("=", 1))
        # Strip a trailing comment, as in "size=3   # kernel".
        for mark in ("#", ";"):
            if mark in value:
                value = value.split(mark, 1)[0].strip()
        sec = sections[-1]
        allowed = SECTION_KEYS[sec.type]
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "(none)"
            raise CfgError(f"{source}:{lineno}: unknown key {key!r} in [{sec.type}] "
                           f"(section at line {sec.line}); valid keys: {valid}")
        if key in sec.options:
            raise CfgError(f"{source}:{lineno}: key {key!r} repeated in [{sec.type}] "
                           f"(first set at line {sec.key_lines[key]})")
        sec.options[key] = value
        sec.key_lines[key] = lineno
        _convert(value, allowed[key], sec, key)  # bad values fail here, with their line
    if not sections:
        raise CfgError(f"{source}: no sections found (expected [net] first)")
    _validate(sections)
    return sections


def _validate(sections: list[Section]) -> None:
    """Checks that need a whole section: required keys and allowed values."""
    net = sections[0]
    for key in ("width", "height"):
        net.require(key)
        if net.get_int(key) <= 0:
            raise net.error(f"key {key!r} must be positive, found {net.get_int(key)}", key)
    if net.get_int("channels", 3) <= 0:
        raise net.error(f"key 'channels' must be positive, found {net.get_int('channels')}",
                        "channels")
    if len(sections) == 1:
        raise CfgError(f"{net.source}: the cfg has no layers after [net]")
    for sec in sections[1:]:
        act = sec.get_str("activation")
        if act is not None and act not in ACTIVATIONS:
            raise sec.error(f"key 'activation': expected one of {', '.join(ACTIVATIONS)}, "
                            f"found {act!r}", "activation")
        for key, kind in SECTION_KEYS[sec.type].items():
            if kind == _INT and key in sec.options and key in (
                    "filters", "size", "stride", "groups", "num", "classes"):
                if sec.get_int(key) <= 0:
                    raise sec.error(f"key {key!r} must be positive, found {sec.get_int(key)}", key)
        for key in ("pad", "padding"):
            if key in sec.options and sec.get_int(key) < 0:
                raise sec.error(f"key {key!r} must be >= 0, found {sec.get_int(key)}", key)
        if sec.type in ("route",):
            sec.require("layers")
        if sec.type == "shortcut":
            sec.require("from")
        if sec.type in ("region", "yolo"):
            sec.require("anchors")
            sec.require("classes")


def parse_cfg(path: str | os.PathLike) -> list[Section]:
    """Read a Darknet cfg file into a list of :class:`Section` (``[net]`` first).

    Raises:
        CfgError: unknown section or key, repeated key, value of the wrong type or missing
            required key; the message names ``file:line``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CfgError(f"cannot read cfg file {path}: {exc}") from exc
    return parse_cfg_text(text, source=str(path))


def format_cfg(sections: list[Section]) -> str:
    """Write sections back as cfg text (comments are not kept)."""
    out: list[str] = []
    for sec in sections:
        out.append(f"[{sec.type}]")
        out.extend(f"{k}={v}" for k, v in sec.options.items())
        out.append("")
    return "\n".join(out)
