"""Generic .kdbnn container (format 2): round trip, compressed metadata tensor, refusal of
corrupt / truncated / older / newer files."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import pytest
import torch

from kd_bnn.deploy import format as fmt
from kd_bnn.deploy.pack import pack_signs


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv2.packed": pack_signs(torch.randn(70, 130, 3, 3, generator=g)),
        "conv2.scale": torch.rand(70, generator=g),
    }


META = {
    "graph": [{"op": "conv", "name": "conv1"}],
    "classes": ["Car", "Pedestrian", "Cyclist"],
    "input_size": [384, 1248],
}


def _saved(tmp_path):
    path = tmp_path / "m.kdbnn"
    size = fmt.save_container(path, _tensors(), META)
    assert size == path.stat().st_size
    return path


def _header(blob: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8 : 8 + n])


def _write_raw(path, tensors: dict, md: dict) -> None:
    """A safetensors file with exactly these tensors and __metadata__ (no kdbnn bookkeeping)."""
    from safetensors.torch import save

    path.write_bytes(save(tensors, metadata=md))


def _md(tensors: dict, **changes) -> dict:
    md = {"format": "kdbnn", "format_version": str(fmt.FORMAT_VERSION),
          "meta_encoding": fmt.META_ENCODING, "checksum": fmt.tensors_checksum(tensors)}
    md.update(changes)
    return md


def test_round_trip(tmp_path):
    path = _saved(tmp_path)
    tensors, meta = fmt.load_container(path)
    assert meta == META
    ref = _tensors()
    assert set(tensors) == set(ref)  # the metadata tensor is not handed back as a weight
    for k, v in ref.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v)
    assert fmt.read_metadata(path) == META
    assert b"pickle" not in path.read_bytes()[:200]


def test_header_holds_only_framing_and_meta_is_a_compressed_tensor(tmp_path):
    path = _saved(tmp_path)
    blob = path.read_bytes()
    n, header = _header(blob)
    md = header["__metadata__"]
    assert set(md) == {"format", "format_version", "meta_encoding", "checksum"}
    assert md["format_version"] == "2" == str(fmt.MIN_FORMAT_VERSION)  # no 8-bit activations: version 2
    info = header[fmt.META_TENSOR]
    assert info["dtype"] == "U8"
    start, stop = info["data_offsets"]
    raw = blob[8 + n + start : 8 + n + stop]
    d = zlib.decompressobj(zdict=fmt.META_ZDICT)
    assert json.loads(d.decompress(raw)) == META
    with pytest.raises(ValueError, match="reserved"):
        fmt.save_container(tmp_path / "x.kdbnn", {"meta": torch.zeros(1)}, META)


def test_meta_dictionary_is_frozen():
    """The preset dictionary is part of format version 2: editing it breaks every v2 file."""
    assert hashlib.sha256(fmt.META_ZDICT).hexdigest() == (
        "ee43d08ef98b8e3f5ef42adbc4eee7329b3dc780ff4eb0fbc165836c9985c799"
    ), "META_ZDICT changed: restore it, or bump FORMAT_VERSION and keep the old one for reading"


@pytest.mark.parametrize("where", ["weights", "meta"])
def test_checksum_detects_a_flipped_bit(tmp_path, where):
    path = _saved(tmp_path)
    blob = bytearray(path.read_bytes())
    n, header = _header(bytes(blob))
    name = "conv1.weight" if where == "weights" else fmt.META_TENSOR
    start, stop = header[name]["data_offsets"]
    blob[8 + n + (start + stop) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(fmt.FormatError, match="checksum mismatch"):
        fmt.load_container(path)


@pytest.mark.parametrize("keep", [0, 5, 12, -1, -100])
def test_truncated_files_are_refused(tmp_path, keep):
    path = _saved(tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[:keep] if keep >= 0 else blob[:keep])
    with pytest.raises(fmt.FormatError, match="truncated"):
        fmt.load_container(path)
    if keep < 0:  # the metadata tensor is the last one: read_metadata notices too
        with pytest.raises(fmt.FormatError, match="truncated"):
            fmt.read_metadata(path)


def _rewrite_metadata(path, **changes):
    blob = path.read_bytes()
    n, header = _header(blob)
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def test_newer_version_is_refused(tmp_path):
    path = _saved(tmp_path)
    _rewrite_metadata(path, format_version=str(fmt.FORMAT_VERSION + 1))
    with pytest.raises(fmt.FormatError, match="newer"):
        fmt.load_container(path)
    with pytest.raises(fmt.FormatError, match="newer"):
        fmt.read_metadata(path)


def test_version_1_file_is_refused_with_reexport_advice(tmp_path):
    """A format-1 file (metadata JSON in the header, one tensor per weight) is not read."""
    tensors = _tensors()
    path = tmp_path / "v1.kdbnn"
    _write_raw(path, tensors, {"format": "kdbnn", "format_version": "1", "meta": json.dumps(META),
                               "checksum": fmt.tensors_checksum(tensors)})
    for fn in (fmt.load_container, fmt.read_metadata):
        with pytest.raises(fmt.FormatError, match=r"v1\.kdbnn: format version 1 is an older") as err:
            fn(path)
        assert "re-export it from the checkpoint with tools/export.py" in str(err.value)


def test_tampered_metadata_and_foreign_files(tmp_path):
    path = _saved(tmp_path)
    _rewrite_metadata(path, format="onnx")
    with pytest.raises(fmt.FormatError, match="not a .kdbnn"):
        fmt.load_container(path)
    path = _saved(tmp_path)
    _rewrite_metadata(path, meta_encoding="gzip+yaml")
    with pytest.raises(fmt.FormatError, match="unknown metadata encoding 'gzip\\+yaml'"):
        fmt.load_container(path)
    path = _saved(tmp_path)
    _rewrite_metadata(path, checksum="sha256:" + "0" * 64)
    with pytest.raises(fmt.FormatError, match="checksum"):
        fmt.load_container(path)
    garbage = tmp_path / "g.kdbnn"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(fmt.FormatError):
        fmt.load_container(garbage)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(fmt.FormatError, match="no __metadata__"):
        fmt.load_container(plain)


@pytest.mark.parametrize("payload,match", [
    (b"\x00not zlib at all", "not valid zlib"),
    (zlib.compress(b"{not json", 9), "not valid JSON"),
    (zlib.compress(b"[1, 2]", 9), "must be a JSON object"),
    (zlib.compress(b'{"a": 1}', 9)[:-3], "truncated zlib"),
])
def test_bad_meta_tensor_with_a_consistent_checksum(tmp_path, payload, match):
    """A writer bug (not a flipped bit): the checksum matches but the metadata cannot be read."""
    tensors = dict(_tensors(), meta=torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    path = tmp_path / "bad.kdbnn"
    _write_raw(path, tensors, _md(tensors))
    for fn in (fmt.load_container, fmt.read_metadata):
        with pytest.raises(fmt.FormatError, match=match):
            fn(path)


def test_missing_or_misshapen_meta_tensor(tmp_path):
    tensors = _tensors()
    path = tmp_path / "nometa.kdbnn"
    _write_raw(path, tensors, _md(tensors))
    with pytest.raises(fmt.FormatError, match="no 'meta' tensor"):
        fmt.load_container(path)
    tensors = dict(_tensors(), meta=torch.zeros(4, dtype=torch.int32))
    _write_raw(path, tensors, _md(tensors))
    with pytest.raises(fmt.FormatError, match="must be 1-D uint8"):
        fmt.read_metadata(path)


def test_read_metadata_does_not_read_the_weights(tmp_path, monkeypatch):
    """It seeks to the meta tensor: corrupt weights go unnoticed (load_container catches them)
    and only header + metadata bytes are read."""
    big = {"w": torch.randn(256, 1024)}  # 1 MiB of weights before the metadata
    path = tmp_path / "big.kdbnn"
    fmt.save_container(path, big, META)
    blob = bytearray(path.read_bytes())
    n, header = _header(bytes(blob))
    blob[8 + n + 100] ^= 0xFF
    path.write_bytes(bytes(blob))
    import builtins

    real_open, read_bytes = builtins.open, []

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, k=-1):
            out = self.fh.read(k)
            read_bytes.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    assert fmt.read_metadata(path) == META
    monkeypatch.undo()
    assert sum(read_bytes) < 4096 < 256 * 1024 * 4
    with pytest.raises(fmt.FormatError, match="checksum mismatch"):
        fmt.load_container(path)


def test_trailing_bytes_are_refused(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(fmt.FormatError, match="trailing"):
        fmt.load_container(path)
