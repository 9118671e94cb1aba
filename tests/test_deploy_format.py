"""Generic .kdbnn container: round trip and refusal of corrupt / truncated / newer files."""

from __future__ import annotations

import json
import struct

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


def test_round_trip(tmp_path):
    path = _saved(tmp_path)
    tensors, meta = fmt.load_container(path)
    assert meta == META
    ref = _tensors()
    assert set(tensors) == set(ref)
    for k, v in ref.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v)
    assert fmt.read_metadata(path) == META
    assert b"pickle" not in path.read_bytes()[:200]


def test_checksum_detects_a_flipped_bit(tmp_path):
    path = _saved(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x01
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


def _rewrite_metadata(path, **changes):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
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


def test_tampered_metadata_and_foreign_files(tmp_path):
    path = _saved(tmp_path)
    _rewrite_metadata(path, format="onnx")
    with pytest.raises(fmt.FormatError, match="not a .kdbnn"):
        fmt.load_container(path)
    path = _saved(tmp_path)
    _rewrite_metadata(path, meta="{not json")
    with pytest.raises(fmt.FormatError, match="not valid JSON"):
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


def test_trailing_bytes_are_refused(tmp_path):
    path = _saved(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(fmt.FormatError, match="trailing"):
        fmt.load_container(path)
