"""Bit-packing layout and round trips (kd_bnn.deploy.pack)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_bnn.deploy.pack import (
    as_uint64_numpy,
    num_words,
    pack_activations,
    pack_bits,
    pack_signs,
    packed_weight_nbytes,
    pad_word,
    unpack_activations,
    unpack_bits,
    unpack_signs,
)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (3, 5, 3, 3), (7, 64, 1, 1), (4, 65, 3, 3), (2, 130, 1, 3), (5, 128, 3, 3)],
)
def test_sign_round_trip_and_size(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g)
    w[0, 0, 0, 0] = 0.0  # sign(0) = +1
    words = pack_signs(w)
    c_out, c_in, kh, kw = shape
    assert words.dtype == torch.int64
    assert words.shape == (c_out, kh * kw, num_words(c_in))
    assert words.numel() * 8 == packed_weight_nbytes(c_out, c_in, kh, kw)
    expected = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(words, c_in, kh, kw), expected)


def test_weight_bit_layout_lsb_first_along_channels_then_positions():
    w = -torch.ones(1, 70, 2, 2)
    w[0, 0, 0, 0] = 1  # channel 0, position 0 -> word 0 bit 0
    w[0, 63, 0, 1] = 1  # channel 63, position 1 -> word 0 bit 63
    w[0, 65, 1, 0] = 1  # channel 65, position 2 (kh=1, kw=0) -> word 1 bit 1
    u = as_uint64_numpy(pack_signs(w))
    assert u[0, 0, 0] == 1 and u[0, 0, 1] == 0
    assert u[0, 1, 0] == np.uint64(1) << np.uint64(63) and u[0, 1, 1] == 0
    assert u[0, 2, 0] == 0 and u[0, 2, 1] == 2
    assert u[0, 3, 0] == 0 and u[0, 3, 1] == 0


def test_padding_bits_are_zero():
    w = torch.ones(3, 70, 1, 1)  # all +1: valid bits set, padding bits (70..127) clear
    u = as_uint64_numpy(pack_signs(w))
    assert (u[:, 0, 0] == np.uint64(0xFFFFFFFFFFFFFFFF)).all()
    assert (u[:, 0, 1] == np.uint64((1 << 6) - 1)).all()
    assert as_uint64_numpy(pad_word(70, 1.0)).tolist() == [0xFFFFFFFFFFFFFFFF, 63]
    assert as_uint64_numpy(pad_word(70, -1.0)).tolist() == [0, 0]


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (2, 64, 3, 3), (3, 129, 2, 7)])
def test_activation_round_trip(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    words = pack_activations(x)
    n, c, h, w = shape
    assert words.shape == (n, h, w, num_words(c))
    assert torch.equal(unpack_activations(words, c), torch.where(x >= 0, 1.0, -1.0))
    # NHWC: the words of one pixel are that pixel's channel signs
    assert torch.equal(unpack_bits(words[0, 1, 2], c), x[0, :, 1, 2] >= 0)


def test_pack_bits_matches_python_reference():
    bits = torch.rand(5, 100, generator=torch.Generator().manual_seed(2)) > 0.5
    u = as_uint64_numpy(pack_bits(bits))
    for r in range(5):
        for wi in range(2):
            ref = sum(1 << i for i in range(64) if wi * 64 + i < 100 and bits[r, wi * 64 + i])
            assert int(u[r, wi]) == ref


def test_errors_are_clear():
    with pytest.raises(ValueError, match="groups=1"):
        packed_weight_nbytes(8, 8, 3, 3, groups=2)
    with pytest.raises(ValueError, match="4-D"):
        pack_signs(torch.ones(3, 3))
    with pytest.raises(ValueError, match="expected"):
        unpack_signs(torch.zeros(2, 9, 1, dtype=torch.int64), 65, 3, 3)
    with pytest.raises(ValueError, match="padding value"):
        pad_word(5, 0.0)
