"""Exact storage size of a quantized weight in the packed format (codes, fp16 scales and fp16 zeros)."""

from __future__ import annotations

from kernels.bitpack import packed_words

SCALE_BYTES = 2  # float16
ZERO_BYTES = 2  # float16


def quantized_bytes(out_features: int, in_features: int, *, bits: int, group_size: int) -> int:
    """Bytes of one ``(out_features, in_features)`` weight: packed int32 words plus one fp16 scale and one fp16
    zero point per group of ``group_size`` input columns (a partial last group counts as a group)."""
    n_groups = -(-in_features // group_size)
    return 4 * packed_words(out_features * in_features, bits) + out_features * n_groups * (SCALE_BYTES + ZERO_BYTES)
