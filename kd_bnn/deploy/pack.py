"""Bit-packing of binary weights and activations into 64-bit words.

Layout (shared with the C++ kernels in ``kd_bnn/deploy/kernels/`` and the ``.kdbnn`` format):

* Sign convention: bit = 1 encodes +1 (value >= 0, so 0 maps to +1), bit = 0 encodes -1.
  This is the ``sign`` used by XNOR-Net (Rastegari et al., ECCV 2016) with sign(0) = +1.
* Weights ``(C_out, C_in, KH, KW)`` -> ``(C_out, KH*KW, ceil(C_in/64))`` words: the last axis
  runs along input channels (channel ``c`` is bit ``c % 64`` of word ``c // 64``, LSB first),
  the middle axis along kernel positions ``kh*KW + kw`` (row major).
* Activations ``(N, C, H, W)`` -> ``(N, H, W, ceil(C/64))`` words (NHWC, channels packed the
  same way), so a KW-wide window row of a padded packed map is ``KW*ceil(C/64)`` contiguous words.
* Padding bits (channels ``C..64*ceil(C/64)-1`` of the last word) are always 0. Since the
  kernels XOR a weight word with an activation word, zero padding bits in both never count,
  and the XNOR dot product is ``C*KH*KW - 2*popcount(xor)``.
* Storage: torch has no full uint64 arithmetic, so words are held as ``torch.int64`` tensors
  with the same bits (two's complement; bit 63 set reads as a negative number).
  ``as_uint64_numpy`` gives the unsigned view for inspection.
* Size: ``C_out * KH*KW * ceil(C_in/64) * 8`` bytes per binary conv. Grouped convolutions are
  rejected (``groups != 1``): binary convs in kd_bnn are dense; depthwise convs stay float.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "WORD_BITS",
    "num_words",
    "packed_weight_nbytes",
    "pack_bits",
    "unpack_bits",
    "pack_signs",
    "unpack_signs",
    "pack_activations",
    "unpack_activations",
    "pad_word",
    "as_uint64_numpy",
]

WORD_BITS = 64
_SHIFTS = torch.arange(WORD_BITS, dtype=torch.int64)
# 1 << i for i in 0..63 as int64 (bit 63 is -2**63); distinct powers sum without overflow.
_POW2 = torch.ones(WORD_BITS, dtype=torch.int64) << _SHIFTS


def num_words(channels: int) -> int:
    """Number of 64-bit words that hold ``channels`` bits."""
    if channels < 1:
        raise ValueError(f"channel count must be >= 1, found {channels}")
    return math.ceil(channels / WORD_BITS)


def packed_weight_nbytes(c_out: int, c_in: int, kh: int, kw: int, groups: int = 1) -> int:
    """Exact bytes of a packed binary conv weight: ``C_out*KH*KW*ceil(C_in/64)*8``."""
    if groups != 1:
        raise ValueError(f"binary convs must have groups=1 to be packed, found groups={groups}")
    return c_out * kh * kw * num_words(c_in) * 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor along its last axis into int64 words (LSB first, zero padded).

    Args:
        bits: bool tensor ``(..., L)``.

    Returns:
        int64 tensor ``(..., ceil(L/64))``.
    """
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, found {bits.dtype}")
    length = bits.shape[-1]
    nw = num_words(length)
    pad = nw * WORD_BITS - length
    b = bits.to(torch.int64)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.reshape(*bits.shape[:-1], nw, WORD_BITS)
    return (b * _POW2.to(b.device)).sum(dim=-1)


def unpack_bits(words: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 words ``(..., nw)`` -> bool ``(..., length)``."""
    if words.dtype != torch.int64:
        raise TypeError(f"packed words must be torch.int64, found {words.dtype}")
    nw = words.shape[-1]
    if nw != num_words(length):
        raise ValueError(
            f"{nw} words cannot hold exactly {length} bits (expected {num_words(length)} words)"
        )
    bits = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1
    return bits.reshape(*words.shape[:-1], nw * WORD_BITS)[..., :length].bool()


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """Pack the signs of conv weights ``(C_out, C_in, KH, KW)`` to ``(C_out, KH*KW, ceil(C_in/64))``.

    Bit = 1 where ``w >= 0`` (+1). See the module docstring for the layout.
    """
    if w.dim() != 4:
        raise ValueError(
            f"pack_signs expects a 4-D conv weight (C_out, C_in, KH, KW), found shape {tuple(w.shape)}"
        )
    c_out, c_in, kh, kw = w.shape
    bits = (w.detach() >= 0).permute(0, 2, 3, 1).reshape(c_out, kh * kw, c_in)
    return pack_bits(bits).contiguous()


def unpack_signs(
    words: torch.Tensor, c_in: int, kh: int, kw: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``(C_out, KH*KW, nw)`` words -> ±1 weights ``(C_out, C_in, KH, KW)``."""
    if words.dim() != 3 or words.shape[1] != kh * kw:
        raise ValueError(
            f"packed weight must have shape (C_out, {kh * kw}, {num_words(c_in)}), found {tuple(words.shape)}"
        )
    bits = unpack_bits(words, c_in)  # (C_out, KH*KW, C_in)
    signs = bits.to(dtype) * 2 - 1
    return signs.reshape(words.shape[0], kh, kw, c_in).permute(0, 3, 1, 2).contiguous()


def pack_activations(x: torch.Tensor) -> torch.Tensor:
    """Binarize (``x >= 0`` -> +1) and pack activations ``(N, C, H, W)`` to NHWC words ``(N, H, W, ceil(C/64))``."""
    if x.dim() != 4:
        raise ValueError(f"pack_activations expects (N, C, H, W), found shape {tuple(x.shape)}")
    return pack_bits((x.detach() >= 0).permute(0, 2, 3, 1)).contiguous()


def unpack_activations(
    words: torch.Tensor, channels: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`pack_activations`: NHWC words -> ±1 tensor ``(N, C, H, W)``."""
    if words.dim() != 4:
        raise ValueError(
            f"packed activations must be (N, H, W, nw), found shape {tuple(words.shape)}"
        )
    bits = unpack_bits(words, channels)  # (N, H, W, C)
    return (bits.to(dtype) * 2 - 1).permute(0, 3, 1, 2).contiguous()


def pad_word(channels: int, pad_value: float) -> torch.Tensor:
    """Packed words of one padded position: all valid bits 1 for ``pad_value=+1``, all 0 for -1."""
    if pad_value not in (1.0, -1.0):
        raise ValueError(f"binary padding value must be +1 or -1, found {pad_value}")
    return pack_bits(torch.full((channels,), pad_value > 0, dtype=torch.bool))


def as_uint64_numpy(words: torch.Tensor) -> np.ndarray:
    """Unsigned view of packed int64 words (for inspection and hashing)."""
    return words.detach().cpu().contiguous().numpy().view(np.uint64)
