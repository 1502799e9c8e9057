"""Dense bit packing of unsigned b-bit integers into 32-bit words (format ``bitstream-int32``).

Layout: value ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first; stream bit ``s``
lives in word ``s // 32`` at bit ``s % 32``. Values may straddle two words, so 3-, 5- and 6-bit data take
exactly ``ceil(n*b/32)`` words: nothing is rounded up to 4 or 8 bits. Words are stored as int32 (two's
complement of the unsigned word).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = frozenset(range(1, 9))


def packed_words(count: int, bits: int) -> int:
    """Number of 32-bit words that hold ``count`` values of ``bits`` bits."""
    return -(-count * bits // 32)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")


def pack_bitstream_int32(values: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Pack values into words.

    Args:
        values: any shape, integer dtype, every entry in ``[0, 2**bits)``; packed in row-major order.
        bits: width of each value.
    Returns:
        words: ``(ceil(values.numel() * bits / 32),)`` int32.
    """
    _check_bits(bits)
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack at {bits} bits")
    n_words = packed_words(flat.numel(), bits)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (n * bits,) of 0/1
    stream = torch.nn.functional.pad(stream, (0, n_words * 32 - stream.numel()))
    weights = torch.ones(32, dtype=torch.int64) << torch.arange(32, dtype=torch.int64)
    words = (stream.reshape(n_words, 32) * weights).sum(dim=1)  # unsigned 32-bit values in int64
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_bitstream_int32(words: torch.Tensor, *, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitstream_int32`.

    Args:
        words: ``(n_words,)`` int32.
        bits: width of each value.
        count: number of values to read.
    Returns:
        values: ``(count,)`` uint8.
    """
    _check_bits(bits)
    if words.numel() < packed_words(count, bits):
        raise ValueError(f"{words.numel()} words cannot hold {count} values of {bits} bits")
    unsigned = words.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    stream = (unsigned.unsqueeze(1) >> torch.arange(32, dtype=torch.int64)) & 1
    stream = stream.reshape(-1)[: count * bits].reshape(count, bits)
    weights = torch.ones(bits, dtype=torch.int64) << torch.arange(bits, dtype=torch.int64)
    return (stream * weights).sum(dim=1).to(torch.uint8)
