"""Bit packing: round trips over shapes and widths, and fixed bit patterns written out in binary."""

from __future__ import annotations

import pytest
import torch

from bitplan.kernels.bitpack import pack_bitstream_int32, packed_words, unpack_bitstream_int32


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [1, 7, 32, 33, 100, 4096 + 3])
def test_round_trip(bits: int, count: int) -> None:
    generator = torch.Generator().manual_seed(bits * 1000 + count)
    values = torch.randint(0, 1 << bits, (count,), generator=generator)
    words = pack_bitstream_int32(values, bits=bits)
    assert words.dtype == torch.int32
    assert words.numel() == packed_words(count, bits) == -(-count * bits // 32)
    assert torch.equal(unpack_bitstream_int32(words, bits=bits, count=count), values.to(torch.uint8))


def test_three_bit_is_not_rounded_up() -> None:
    assert packed_words(32, 3) == 3  # 96 bits, not 32 * 4 bits
    assert packed_words(576 * 576, 3) * 32 == 576 * 576 * 3


def test_fixed_patterns() -> None:
    # 4-bit values 1..8: value i sits at bits [4i, 4i+4), least significant first.
    words = pack_bitstream_int32(torch.arange(1, 9), bits=4)
    assert int(words[0]) & 0xFFFFFFFF == 0b1000_0111_0110_0101_0100_0011_0010_0001
    # 3-bit values straddle words: eleven 7s fill 33 bits; the 11th value's top bit is bit 0 of word 1.
    words = pack_bitstream_int32(torch.full((11,), 7), bits=3)
    assert int(words[0]) & 0xFFFFFFFF == 0xFFFFFFFF
    assert int(words[1]) == 0b1
    # 2-bit values 0,1,2,3 -> 0b11_10_01_00
    assert int(pack_bitstream_int32(torch.tensor([0, 1, 2, 3]), bits=2)[0]) == 0b11100100


def test_out_of_range_values_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"values must lie in \[0, 8\)"):
        pack_bitstream_int32(torch.tensor([8]), bits=3)
    with pytest.raises(ValueError, match="bits must be between 1 and 8"):
        pack_bitstream_int32(torch.tensor([1]), bits=9)


def test_three_bit_pattern_written_out_in_binary() -> None:
    # twelve 3-bit values, value i at stream bits [3i, 3i+3), least significant bit first. The 11th (3 = 0b011)
    # starts at bit 30: its low two bits end word 0, its top bit (0) opens word 1; the 12th (4 = 0b100) is at 1-3.
    words = pack_bitstream_int32(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]), bits=3)
    assert words.numel() == 2  # 36 bits
    assert int(words[0]) & 0xFFFFFFFF == 0b11_010_001_000_111_110_101_100_011_010_001
    assert int(words[1]) == 0b100_0
    assert unpack_bitstream_int32(words, bits=3, count=12).tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape", [(8, 64), (24, 192), (5, 576)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_pack_load_round_trip(bits: int, shape: tuple[int, int], group_size: int) -> None:
    """Codes survive packing and QuantLinear's unpacking, uniform and with mixed widths inside the matrix."""
    from bitplan.kernels.quant_linear import QuantLinear
    from bitplan.quantizer.mixed import pack_segments, quantize_rtn_mixed
    from bitplan.quantizer.rtn import dequantize_weight
    from bitplan.quantizer.sizes import quantized_bytes

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    n_groups = -(-shape[1] // group_size)
    for group_bits in ((bits,) * n_groups, tuple(max(2, bits - (g % 2)) for g in range(n_groups))):
        quantized = quantize_rtn_mixed(weight, group_bits, group_size=group_size)
        tensors = pack_segments(quantized)
        layer = QuantLinear(shape[1], shape[0], bits=bits, group_size=group_size, bias=False, group_bits=group_bits)
        layer.load_state_dict(tensors)
        assert torch.equal(layer.dequantized_weight(), dequantize_weight(quantized))
        codes, scales, zeros = layer.codes_scales_zeros()
        assert torch.equal(codes, quantized.codes) and torch.equal(scales, quantized.scales)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == quantized_bytes(
            *shape, bits=bits, group_size=group_size, group_bits=group_bits)
