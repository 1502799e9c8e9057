"""GGML block layouts: stored codes -> the exact bytes llama.cpp's ``ggml-common.h`` structs hold (``block_q4_0``
... ``block_iq4_xs``), the inverse of the ``gguf`` package's ``dequantize_blocks``. Every function takes ``B``
blocks: ``codes (B, block) uint8`` as stored (offset already added: ``Q4_0``'s ``q + 8``, ``Q3_K``'s ``q + 4``),
fp16 headers as ``(B,)`` float32 holding fp16 values, and returns ``(B, type_bytes) uint8``.
"""

from __future__ import annotations

import numpy as np


def _f16(values: np.ndarray) -> np.ndarray:
    """``(B,)`` -> ``(B, 2)`` uint8, little-endian fp16."""
    return np.ascontiguousarray(values.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (low & 0x0F) | ((high & 0x0F) << 4)


def _bits(codes: np.ndarray, groups: int, width: int) -> np.ndarray:
    """``codes (B, groups * L)``: group ``g``'s ``L`` values go to bits ``g * width`` of ``L`` bytes."""
    split = codes.reshape(codes.shape[0], groups, -1).astype(np.uint8)
    out = np.zeros((codes.shape[0], split.shape[2]), dtype=np.uint8)
    for g in range(groups):
        out |= (split[:, g] & ((1 << width) - 1)) << (g * width)
    return out


def _legacy_nibbles(codes: np.ndarray) -> np.ndarray:
    """32 codes -> 16 bytes: element ``j`` in the low nibble of byte ``j``, element ``j + 16`` in the high."""
    return _nibbles(codes[:, :16], codes[:, 16:])


def _high_bits_u32(codes: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes -> one little-endian uint32 (bit ``j`` for element ``j``) as 4 bytes."""
    return np.packbits((codes >> 4) & 1, axis=-1, bitorder="little")


def pack_q4_0(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16(d), _legacy_nibbles(codes)], axis=1)


def pack_q4_1(d: np.ndarray, m: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16(d), _f16(m), _legacy_nibbles(codes)], axis=1)


def pack_q5_0(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16(d), _high_bits_u32(codes), _legacy_nibbles(codes)], axis=1)


def pack_q5_1(d: np.ndarray, m: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16(d), _f16(m), _high_bits_u32(codes), _legacy_nibbles(codes)], axis=1)


def pack_q8_0(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``codes``: the int8 values, as ``(B, 32)`` int8 or their uint8 bit patterns."""
    return np.concatenate([_f16(d), codes.astype(np.int8).view(np.uint8)], axis=1)


def pack_iq4_nl(d: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``codes``: indices into ``kvalues_iq4nl``."""
    return pack_q4_0(d, codes)


def _k_low2(codes: np.ndarray) -> np.ndarray:
    """256 codes' low 2 bits -> 64 bytes: element ``128 h + 32 s + l`` at bits ``2 s`` of byte ``32 h + l``."""
    halves = codes.reshape(codes.shape[0], 2, 128)
    return np.concatenate([_bits(halves[:, 0], 4, 2), _bits(halves[:, 1], 4, 2)], axis=1)


def pack_q2_k(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, mins: np.ndarray,
              codes: np.ndarray) -> np.ndarray:
    """``scales``, ``mins (B, 16)`` 4-bit codes; ``codes (B, 256)`` in ``0..3``."""
    return np.concatenate([_nibbles(scales, mins), _k_low2(codes), _f16(d), _f16(dmin)], axis=1)


def _k_scales_3(scales: np.ndarray) -> np.ndarray:
    """Q3_K's 16 6-bit scales -> 12 bytes: the low nibbles of scales ``j`` and ``j + 8`` in byte ``j``, the high
    2 bits of scale ``4 s + j`` at bits ``2 s`` of byte ``8 + j``."""
    low = _nibbles(scales[:, :8], scales[:, 8:])
    high = _bits(scales >> 4, 4, 2)
    return np.concatenate([low, high], axis=1)


def pack_q3_k(d: np.ndarray, scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``scales (B, 16)`` stored ``scale + 32``; ``codes (B, 256)`` stored ``q + 4`` in ``0..7`` (bit 2 goes to
    ``hmask``: element ``32 b + l`` at bit ``b`` of byte ``l``)."""
    hmask = _bits(codes >> 2, 8, 1)
    return np.concatenate([hmask, _k_low2(codes & 3), _k_scales_3(scales), _f16(d)], axis=1)


def _k_scales_4(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 8 6-bit scales and 8 6-bit mins -> 12 bytes (``get_scale_min_k4``'s layout)."""
    first = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    second = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    third = _nibbles(scales[:, 4:], mins[:, 4:])
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def _k_nibbles(codes: np.ndarray) -> np.ndarray:
    """256 codes -> 128 bytes: element ``64 c + 32 k + l`` in nibble ``k`` of byte ``32 c + l``."""
    quads = codes.reshape(codes.shape[0], 4, 2, 32)
    return _nibbles(quads[:, :, 0], quads[:, :, 1]).reshape(codes.shape[0], 128)


def pack_q4_k(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, mins: np.ndarray,
              codes: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16(d), _f16(dmin), _k_scales_4(scales, mins), _k_nibbles(codes)], axis=1)


def pack_q5_k(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, mins: np.ndarray,
              codes: np.ndarray) -> np.ndarray:
    """``codes`` in ``0..31``: bit 4 of element ``32 b + l`` at bit ``b`` of ``qh`` byte ``l``."""
    qh = _bits(codes >> 4, 8, 1)
    return np.concatenate([_f16(d), _f16(dmin), _k_scales_4(scales, mins), qh, _k_nibbles(codes)], axis=1)


def pack_q6_k(d: np.ndarray, scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``scales (B, 16)`` int8 values; ``codes (B, 256)`` stored ``q + 32`` in ``0..63``: element
    ``128 h + 64 k + l`` (``l < 64``) in nibble ``k`` of ``ql`` byte ``64 h + l``, its bits 4-5 in ``qh`` as
    ``_k_low2`` places them."""
    halves = codes.reshape(codes.shape[0], 2, 2, 64)
    ql = _nibbles(halves[:, :, 0], halves[:, :, 1]).reshape(codes.shape[0], 128)
    qh = _k_low2(codes >> 4)
    return np.concatenate([ql, qh, scales.astype(np.int8).view(np.uint8), _f16(d)], axis=1)


def pack_iq4_xs(d: np.ndarray, scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``scales (B, 8)`` stored ``scale + 32`` (6 bits: low nibbles two to a byte in ``scales_l``, high 2 bits
    of sub-block ``j`` at bits ``2 j`` of the uint16 ``scales_h``); ``codes (B, 256)``: table indices, sub-block
    ``j``'s 32 as :func:`_legacy_nibbles` packs a block."""
    scales = scales.astype(np.uint16)
    high = np.zeros(scales.shape[0], dtype=np.uint16)
    for j in range(8):
        high |= ((scales[:, j] >> 4) & 3) << (2 * j)
    low = _nibbles(scales[:, 0::2].astype(np.uint8), scales[:, 1::2].astype(np.uint8))
    blocks = codes.reshape(-1, 32)
    qs = _legacy_nibbles(blocks).reshape(codes.shape[0], 128)
    return np.concatenate([_f16(d), high.astype("<u2").view(np.uint8).reshape(-1, 2), low, qs], axis=1)
