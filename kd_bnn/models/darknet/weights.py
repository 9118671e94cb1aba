"""Darknet ``.weights`` files: a small header, then every layer's float32 parameters in order.

Layout (Darknet ``parser.c``, ``load_weights_upto`` / ``save_weights_upto``), little endian:

* header: int32 ``major``, int32 ``minor``, int32 ``revision``, then ``seen`` (images seen in
  training) as int64 when ``major*10 + minor >= 2 and major < 1000 and minor < 1000``, else int32;
* per ``[convolutional]`` layer, in cfg order: with ``batch_normalize=1`` the BN bias (beta),
  BN scale (gamma), rolling mean, rolling variance (``filters`` floats each); without it the
  conv bias (``filters`` floats); then the conv weights, ``filters * channels/groups * size *
  size`` floats in (out, in, kh, kw) order — the same order as ``torch.nn.Conv2d.weight``.

The reader is strict where Darknet is not: a file shorter or longer than the cfg needs is an
error that gives both float counts and the layer where the data ran out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_bnn.io import atomic_write_bytes

__all__ = ["WeightsError", "WeightsHeader", "LayerBlobs", "read_weights", "write_weights",
           "header_size"]


class WeightsError(ValueError):
    """A ``.weights`` file that does not fit its cfg."""


@dataclass
class WeightsHeader:
    """The version triple and the ``seen`` counter at the start of a ``.weights`` file."""

    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_is_int64(self) -> bool:
        """Darknet ``parser.c``: ``seen`` is a size_t (int64) from version 0.2 on."""
        return (self.major * 10 + self.minor) >= 2 and self.major < 1000 and self.minor < 1000


@dataclass
class LayerBlobs:
    """What one layer stores: ``blobs`` is a list of (name, float count) in file order.

    ``label`` names the layer in messages, e.g. ``"layer 12 ([convolutional] at a.cfg:85)"``.
    """

    label: str
    blobs: list[tuple[str, int]]

    @property
    def count(self) -> int:
        return sum(n for _, n in self.blobs)


def header_size(header: WeightsHeader) -> int:
    """Size of the header in bytes (20 or 16)."""
    return 12 + (8 if header.seen_is_int64 else 4)


def _read_header(data: bytes, path: str) -> tuple[WeightsHeader, int]:
    if len(data) < 16:
        raise WeightsError(f"{path}: {len(data)} bytes is too short for a Darknet weights header "
                           "(at least 16 bytes)")
    major, minor, revision = (int(v) for v in np.frombuffer(data, "<i4", count=3))
    header = WeightsHeader(major, minor, revision)
    if header.seen_is_int64:
        if len(data) < 20:
            raise WeightsError(f"{path}: version {major}.{minor} needs a 20-byte header, the file "
                               f"has {len(data)} bytes")
        header.seen = int(np.frombuffer(data, "<i8", count=1, offset=12)[0])
        return header, 20
    header.seen = int(np.frombuffer(data, "<i4", count=1, offset=12)[0])
    return header, 16


def read_weights(path: str | os.PathLike, layers: Sequence[LayerBlobs]
                 ) -> tuple[WeightsHeader, list[dict[str, np.ndarray]]]:
    """Read a ``.weights`` file laid out for ``layers``.

    Returns:
        The header and, per layer, ``{blob name: float32 array}`` (flat, in file order).

    Raises:
        WeightsError: the file is shorter or longer than the layers need (both counts given,
            and the layer and blob where it ran out), or its size is not whole floats.
    """
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    header, offset = _read_header(data, path)
    body = len(data) - offset
    needed = sum(layer.count for layer in layers)
    if body % 4:
        raise WeightsError(f"{path}: {body} bytes after the {offset}-byte header is not a whole "
                           f"number of float32 values")
    available = body // 4
    floats = np.frombuffer(data, "<f4", offset=offset)
    out: list[dict[str, np.ndarray]] = []
    pos = 0
    for layer in layers:
        blobs: dict[str, np.ndarray] = {}
        for name, n in layer.blobs:
            if pos + n > available:
                raise WeightsError(
                    f"{path}: weights file too short: the cfg needs {needed} floats after the "
                    f"header, the file has {available}; it ran out in {layer.label} reading "
                    f"{name!r} ({n} floats needed at float offset {pos}, {available - pos} left)")
            blobs[name] = floats[pos:pos + n].astype(np.float32, copy=True)
            pos += n
        out.append(blobs)
    if pos != available:
        raise WeightsError(
            f"{path}: weights file too long: the cfg needs {needed} floats after the header, the "
            f"file has {available} ({available - needed} left over after the last layer, "
            f"{layers[-1].label if layers else 'no layer with weights'}); do cfg and weights match?")
    return header, out


def write_weights(path: str | os.PathLike, header: WeightsHeader,
                  layers: Sequence[dict[str, np.ndarray]]) -> None:
    """Write a ``.weights`` file atomically: the header, then each layer's blobs in dict order."""
    parts = [np.array([header.major, header.minor, header.revision], dtype="<i4").tobytes()]
    if header.seen_is_int64:
        parts.append(np.array([header.seen], dtype="<i8").tobytes())
    else:
        parts.append(np.array([header.seen], dtype="<i4").tobytes())
    for blobs in layers:
        for arr in blobs.values():
            parts.append(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    atomic_write_bytes(path, b"".join(parts))
