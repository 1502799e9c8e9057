"""Exact storage size of a quantized weight in the packed format (codes, fp16 scales and fp16 zeros)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bitplan.kernels.bitpack import packed_words

if TYPE_CHECKING:
    from bitplan.quantizer.rtn import QuantizedWeight

SCALE_BYTES = 2  # float16
ZERO_BYTES = 2  # float16


def quantized_bytes(out_features: int, in_features: int, *, bits: int, group_size: int,
                    group_bits: Sequence[int] | None = None, scale_bits: int | None = None) -> int:
    """Bytes of one ``(out_features, in_features)`` weight: packed int32 words plus one fp16 scale and one fp16
    zero point per group of ``group_size`` input columns (a partial last group counts as a group). With
    ``group_bits`` (one width per column group), the codes of each width are packed as one matrix of their own
    (the ``segments-by-width`` layout, :mod:`kernels.quant_linear`). With ``scale_bits`` (double-quantized
    scales, one width) the scales and the zeros are each packed ``scale_bits``-bit codes, plus four fp16 values
    per row (each grid's low and step)."""
    n_groups = -(-in_features // group_size)
    widths = [bits] * n_groups if group_bits is None else list(group_bits)
    code_bytes = 0
    for width in set(widths):
        columns = sum(min(group_size, in_features - g * group_size) for g, b in enumerate(widths) if b == width)
        code_bytes += 4 * packed_words(out_features * columns, width)
    if scale_bits is not None:
        return code_bytes + 2 * 4 * packed_words(out_features * n_groups, scale_bits) + out_features * 4 * SCALE_BYTES
    return code_bytes + out_features * n_groups * (SCALE_BYTES + ZERO_BYTES)


def stored_bytes(quantized: QuantizedWeight) -> int:
    """Bytes :func:`quantized_bytes` gives a quantized weight, mixed widths inside included."""
    return quantized_bytes(*quantized.codes.shape, bits=quantized.bits, group_size=quantized.group_size,
                           group_bits=quantized.group_bits, scale_bits=quantized.scale_bits)
