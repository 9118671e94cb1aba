"""Generic ``.kdbnn`` container: a safetensors file (no pickle) with validated metadata.

Layout: safetensors' own header (8-byte little-endian length + JSON) whose ``__metadata__``
(string -> string) holds

* ``format``: ``"kdbnn"``; ``format_version``: an integer, refused when newer than
  :data:`FORMAT_VERSION`;
* ``meta``: a JSON document (layer graph, class names, input size, anchors, ... - filled by the
  exporter; this module treats it as opaque JSON);
* ``checksum``: ``sha256:<hex>`` over every tensor's name, dtype, shape and bytes in name order,
  so a flipped bit in any weight, a renamed or reshaped tensor is detected.

Loading checks, in order: size and header framing (truncation), the header JSON, the format
name and version, the tensor byte ranges against the file size, the tensors themselves, then
the checksum. Every failure raises :class:`FormatError` naming the file and what was wrong.
Bit-packed binary weights are stored as int64 words (see ``kd_bnn.deploy.pack``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from kd_bnn.io import atomic_write_bytes

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FormatError",
    "tensors_checksum",
    "save_container",
    "load_container",
    "read_metadata",
]

FORMAT_NAME = "kdbnn"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


class FormatError(ValueError):
    """A .kdbnn file is corrupt, truncated, of a newer version, or not a .kdbnn file."""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over names, dtypes, shapes and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(
            name.encode()
            + b"\0"
            + str(t.dtype).encode()
            + b"\0"
            + repr(tuple(t.shape)).encode()
            + b"\0"
        )
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def save_container(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> int:
    """Write tensors + JSON metadata atomically; returns the file size in bytes."""
    from safetensors.torch import save

    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a JSON-serialisable dict, found {type(meta).__name__}")
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta, sort_keys=True),
        "checksum": tensors_checksum(clean),
    }
    data = save(clean, metadata=header)
    atomic_write_bytes(path, data)
    return len(data)


def _parse_header(path: Path, blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise FormatError(
            f"{path}: truncated file ({len(blob)} bytes; a .kdbnn file starts with an 8-byte header length)"
        )
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER:
        raise FormatError(
            f"{path}: not a .kdbnn/safetensors file (header length {n} is implausible)"
        )
    if len(blob) < 8 + n:
        raise FormatError(
            f"{path}: truncated file: header needs {8 + n} bytes, file has {len(blob)}"
        )
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: corrupt header JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise FormatError(
            f"{path}: corrupt header: expected a JSON object, found {type(header).__name__}"
        )
    return header


def _check_metadata(path: Path, header: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    md = header.get("__metadata__")
    if not isinstance(md, dict):
        raise FormatError(f"{path}: not a .kdbnn file (safetensors header has no __metadata__)")
    if md.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{path}: not a .kdbnn file (metadata 'format' is {md.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    try:
        version = int(md.get("format_version", ""))
    except ValueError as exc:
        raise FormatError(
            f"{path}: bad metadata 'format_version' {md.get('format_version')!r}, expected an integer"
        ) from exc
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {version} is newer than this kd_bnn supports "
            f"({FORMAT_VERSION}); upgrade kd_bnn to read it"
        )
    if version < 1:
        raise FormatError(f"{path}: bad format version {version}")
    for key in ("meta", "checksum"):
        if key not in md:
            raise FormatError(f"{path}: metadata key '{key}' is missing (found {sorted(md)})")
    try:
        meta = json.loads(md["meta"])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: metadata 'meta' is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise FormatError(
            f"{path}: metadata 'meta' must be a JSON object, found {type(meta).__name__}"
        )
    return md, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Validated JSON metadata of a .kdbnn file without loading (or checksumming) the tensors."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += fh.read(min(n, _MAX_HEADER + 1))
    _md, meta = _check_metadata(path, _parse_header(path, head))
    return meta


def load_container(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and fully validate a .kdbnn file; returns ``(tensors, meta)``."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .kdbnn file")
    blob = path.read_bytes()
    header = _parse_header(path, blob)
    md, meta = _check_metadata(path, header)
    (n,) = struct.unpack("<Q", blob[:8])
    data_len = len(blob) - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(
                f"{path}: corrupt header entry for tensor '{name}' ({exc!r})"
            ) from exc
        if stop - start != count * width or start < 0:
            raise FormatError(
                f"{path}: corrupt header: tensor '{name}' spans {stop - start} bytes, "
                f"its shape needs {count * width}"
            )
        end = max(end, stop)
    if end > data_len:
        raise FormatError(
            f"{path}: truncated file: tensors need {end} data bytes, file has {data_len}"
        )
    if end < data_len:
        raise FormatError(f"{path}: corrupt file: {data_len - end} unexpected trailing bytes")
    try:
        tensors = load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise FormatError(f"{path}: corrupt tensor data ({type(exc).__name__}: {exc})") from exc
    found = tensors_checksum(tensors)
    if found != md["checksum"]:
        raise FormatError(
            f"{path}: checksum mismatch (stored {md['checksum'][:23]}..., "
            f"computed {found[:23]}...): the file is corrupt or was tampered with"
        )
    return tensors, meta
