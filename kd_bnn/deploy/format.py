"""Generic ``.kdbnn`` container (format versions 2 and 3): a safetensors file (no pickle) whose
JSON metadata travels compressed inside a checksummed tensor.

Layout: safetensors' own framing (8-byte little-endian header length + header JSON + tensor
data). The header's ``__metadata__`` (string -> string) holds only

* ``format``: ``"kdbnn"``; ``format_version``: an integer, the lowest that can hold the file's
  content: ``"2"``, or ``"3"`` for a model whose metadata needs a version-3 reader (8-bit
  activations: `kd_bnn.deploy.quantize`), so that a reader without that mode refuses it
  ("upgrade kd_bnn") instead of running something else; a version newer than
  :data:`FORMAT_VERSION` is refused so, one older than :data:`MIN_FORMAT_VERSION` too ("re-export
  it from the checkpoint");
* ``meta_encoding``: ``"zlib+json;zdict=kdbnn2"``;
* ``checksum``: ``sha256:<hex>`` over every tensor's name, dtype, shape and bytes in name order
  (:func:`tensors_checksum`), the ``meta`` tensor included, so a flipped bit in any weight, a
  renamed or reshaped tensor, or an edited metadata document is detected.

The tensors are the caller's (the model exporter stores a few flat per-dtype blobs) plus
``meta``: uint8, 1-D, the caller's metadata dict as compact sorted-key JSON, zlib-compressed
(level 9) with a fixed preset dictionary (:data:`META_ZDICT`: the metadata schema's and Darknet
cfg text's vocabulary; part of the format version). Putting it in a tensor makes the checksum cover it and lets :func:`read_metadata`
seek to its byte range without reading the weights.

Loading checks, in order: size and header framing (truncation), the header JSON, the format
name and version, the tensor byte ranges against the file size, the tensors themselves, the
checksum, then the metadata encoding and JSON. Every failure raises :class:`FormatError` naming
the file and what was wrong. Bit-packed binary weights are stored as int64 words (see
``kd_bnn.deploy.pack``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from kd_bnn.io import atomic_write_bytes

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MIN_FORMAT_VERSION",
    "META_ENCODING",
    "META_TENSOR",
    "META_ZDICT",
    "FormatError",
    "tensors_checksum",
    "encode_meta",
    "save_container",
    "is_kdbnn_file",
    "load_container",
    "read_metadata",
]

FORMAT_NAME = "kdbnn"
#: newest format version this reader reads (3: adds the 8-bit activation metadata)
FORMAT_VERSION = 3
#: oldest format version this reader reads, and the version written unless the content needs more
MIN_FORMAT_VERSION = 2
META_TENSOR = "meta"
META_ENCODING = "zlib+json;zdict=kdbnn2"

# A fixed zlib preset dictionary (RFC 1950 FDICT) for the metadata: the vocabulary of the
# exporter's metadata schema and of Darknet cfg text (most of a Darknet student's metadata), so
# the description of a small model costs about half as much (demo student: 822 -> ~380 bytes).
# It is part of format version 2: a changed byte makes every v2 file unreadable (zlib refuses
# the stream, whose header names the dictionary's Adler-32), so never edit it - bump
# FORMAT_VERSION and keep the old one for reading instead. tests/test_deploy_format.py pins it.
_CFG_VOCAB = (
    "[net]\\nbatch=64\\nsubdivisions=8\\nwidth=\\nheight=\\nchannels=3\\nmomentum=0.9\\ndecay=0.0005\\nangle=0\\n"
    "saturation=1.5\\nexposure=1.5\\nhue=.1\\nlearning_rate=0.001\\nburn_in=1000\\nmax_batches=\\npolicy=steps\\n"
    "steps=\\nscales=.1,.1\\n\\n[maxpool]\\nsize=2\\nstride=2\\n\\n[route]\\nlayers=-1,-4\\n\\n[reorg]\\nstride=2\\n\\n"
    "[shortcut]\\nfrom=-3\\nactivation=linear\\n\\n[upsample]\\nstride=2\\n\\n[yolo]\\nmask=\\n"
    "[region]\\nanchors=\\nbias_match=1\\nclasses=\\ncoords=4\\nnum=5\\nsoftmax=1\\njitter=.2\\nrescore=1\\n"
    "object_scale=5\\nnoobject_scale=1\\nclass_scale=1\\ncoord_scale=1\\nabsolute=1\\nthresh=.6\\nrandom=1\\n\\n"
    "[convolutional]\\nsize=1\\nstride=1\\npad=1\\nfilters=\\nactivation=linear\\n\\n"
    "[convolutional]\\nbatch_normalize=1\\nfilters=\\nsize=3\\nstride=1\\npad=1\\nactivation=leaky\\n\\n"
)
_SCHEMA_VOCAB = (
    '{"anchors":[[[,"binary":{"input_scaling":"none","mode":"bwn","num_binary_convs":,"pad_value":-1.0,'
    '"weight_scaling":"mean_abs"},"class_names":["Car","Pedestrian","Cyclist"],"input_size":[,'
    '"kind":"kdbnn-model","layers":[{"input_scaling":"xnor_k","mode":"xnor","pad_value":1.0,'
    '"weight_scaling":"learned",{"kind":"other","path":"{"kind":"bn","path":"'
    '{"bn":".bn","kind":"float_conv","path":".conv"},{"bn":".bn","kind":"binary_conv","path":".conv"},'
    '"skeleton":{"family":"darknet","options":{"preset":"small","mode":"xnor"},"cfg_text":"'
    '"source":{"checkpoint":null,"config":"configs/"}}'
)
META_ZDICT = (_CFG_VOCAB + _SCHEMA_VOCAB).encode()
_MAX_HEADER = 100 * 1024 * 1024
_MAX_META = 64 * 1024 * 1024  # decompressed metadata limit (a zlib bomb is refused, not inflated)
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
    """A .kdbnn file is corrupt, truncated, of another version, or not a .kdbnn file."""


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


def encode_meta(meta: dict[str, Any]) -> torch.Tensor:
    """The ``meta`` tensor of a metadata dict: compact sorted-key JSON, zlib level 9 with the
    :data:`META_ZDICT` preset dictionary, as uint8."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a JSON-serialisable dict, found {type(meta).__name__}")
    raw = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    z = zlib.compressobj(9, zdict=META_ZDICT)
    return torch.frombuffer(bytearray(z.compress(raw) + z.flush()), dtype=torch.uint8).clone()


def save_container(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
    version: int = MIN_FORMAT_VERSION,
) -> int:
    """Write tensors + metadata (as the compressed ``meta`` tensor) atomically as format
    ``version`` (the lowest that can hold the content); returns the file size in bytes."""
    from safetensors.torch import save

    if not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        raise ValueError(f"format version {version} is not one this kd_bnn writes "
                         f"({MIN_FORMAT_VERSION}..{FORMAT_VERSION})")
    if META_TENSOR in tensors:
        raise ValueError(f"tensor name {META_TENSOR!r} is reserved for the metadata")
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    clean[META_TENSOR] = encode_meta(meta)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(version),
        "meta_encoding": META_ENCODING,
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


def _check_metadata(path: Path, header: dict[str, Any]) -> dict[str, str]:
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
    if 1 <= version < MIN_FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {version} is an older .kdbnn format that this kd_bnn "
            f"(formats {MIN_FORMAT_VERSION}-{FORMAT_VERSION}) no longer reads; re-export it from the checkpoint with "
            "tools/export.py --config CONFIG --checkpoint CKPT --out FILE"
        )
    if version < 1:
        raise FormatError(f"{path}: bad format version {version}")
    for key in ("meta_encoding", "checksum"):
        if key not in md:
            raise FormatError(f"{path}: metadata key '{key}' is missing (found {sorted(md)})")
    if md["meta_encoding"] != META_ENCODING:
        raise FormatError(
            f"{path}: unknown metadata encoding {md['meta_encoding']!r}, expected {META_ENCODING!r}"
        )
    info = header.get(META_TENSOR)
    if not isinstance(info, dict):
        raise FormatError(f"{path}: no '{META_TENSOR}' tensor (the compressed model description)")
    if info.get("dtype") != "U8" or not isinstance(info.get("shape"), list) or len(info["shape"]) != 1:
        raise FormatError(
            f"{path}: tensor '{META_TENSOR}' must be 1-D uint8, found dtype {info.get('dtype')!r} "
            f"shape {info.get('shape')!r}"
        )
    return md


def _decode_meta(path: Path, raw: bytes) -> dict[str, Any]:
    d = zlib.decompressobj(zdict=META_ZDICT)
    try:
        text = d.decompress(raw, _MAX_META)
    except zlib.error as exc:
        raise FormatError(f"{path}: tensor '{META_TENSOR}' is not valid zlib data ({exc})") from exc
    if d.unconsumed_tail:
        raise FormatError(f"{path}: tensor '{META_TENSOR}' inflates beyond {_MAX_META} bytes")
    if not d.eof:
        raise FormatError(f"{path}: tensor '{META_TENSOR}' is a truncated zlib stream")
    try:
        meta = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: metadata in tensor '{META_TENSOR}' is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise FormatError(
            f"{path}: metadata in tensor '{META_TENSOR}' must be a JSON object, found {type(meta).__name__}"
        )
    return meta


def _meta_range(path: Path, header: dict[str, Any]) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in header[META_TENSOR]["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: corrupt header entry for tensor '{META_TENSOR}' ({exc!r})") from exc
    if start < 0 or stop - start != int(header[META_TENSOR]["shape"][0]):
        raise FormatError(
            f"{path}: corrupt header: tensor '{META_TENSOR}' spans {stop - start} bytes, "
            f"its shape needs {header[META_TENSOR]['shape'][0]}"
        )
    return start, stop


def is_kdbnn_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file whose safetensors header says ``format: kdbnn`` (any version):
    the only kind of existing file an export may replace."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8 or struct.unpack("<Q", head)[0] > _MAX_HEADER:
                return False
            head += fh.read(struct.unpack("<Q", head)[0])
        md = _parse_header(Path(path), head).get("__metadata__")
    except (OSError, FormatError):
        return False
    return isinstance(md, dict) and md.get("format") == FORMAT_NAME


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a .kdbnn file without loading the weights: reads the header and seeks to the
    ``meta`` tensor's byte range. Framing, format name/version and the metadata encoding and
    JSON are validated; the checksum is not (only :func:`load_container` reads every byte)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += fh.read(min(n, _MAX_HEADER + 1))
        header = _parse_header(path, head)
        _check_metadata(path, header)
        start, stop = _meta_range(path, header)
        (n,) = struct.unpack("<Q", head[:8])
        fh.seek(8 + n + start)
        raw = fh.read(stop - start)
    if len(raw) != stop - start:
        raise FormatError(
            f"{path}: truncated file: tensor '{META_TENSOR}' needs bytes {8 + n + start}..{8 + n + stop}, "
            f"file ends at {8 + n + start + len(raw)}"
        )
    return _decode_meta(path, raw)


def load_container(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and fully validate a .kdbnn file; returns ``(tensors, meta)`` (``tensors`` without
    the ``meta`` tensor)."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .kdbnn file")
    blob = path.read_bytes()
    header = _parse_header(path, blob)
    md = _check_metadata(path, header)
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
    meta = _decode_meta(path, tensors.pop(META_TENSOR).numpy().tobytes())
    return tensors, meta
