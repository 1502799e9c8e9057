"""Round-to-nearest quantization and the exact size model."""

from __future__ import annotations

import pytest
import torch

from bitplan.kernels.bitpack import pack_bitstream_int32
from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.quantizer.sizes import quantized_bytes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape, group_size", [((6, 8), 4), ((5, 96), 64), ((3, 576), 128), ((4, 10), 128)])
def test_error_within_half_step(bits: int, shape: tuple[int, int], group_size: int) -> None:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    q = quantize_rtn(weight, bits=bits, group_size=group_size)
    n_groups = -(-shape[1] // group_size)
    assert q.codes.shape == shape and q.scales.shape == q.zeros.shape == (shape[0], n_groups)
    assert int(q.codes.max()) < 1 << bits
    step = q.scales.float().repeat_interleave(group_size, dim=1)[:, : shape[1]]
    # Half a step from rounding, and up to one step at the range ends where the rounded zero point clips.
    assert ((dequantize_weight(q) - weight).abs() <= step * 1.01).all()


def test_ragged_last_group_uses_only_its_columns() -> None:
    weight = torch.zeros(1, 10)
    weight[0, 8:] = torch.tensor([1.0, 3.0])  # the last group (columns 8, 9) spans [0, 3] with zero included
    weight[0, 4:8] = 6.0  # would widen the last group's range if the padding leaked into it
    q = quantize_rtn(weight, bits=2, group_size=4)
    assert float(q.scales[0, 2]) == pytest.approx(1.0, rel=1e-3)
    assert torch.allclose(dequantize_weight(q)[0, 8:], torch.tensor([1.0, 3.0]), atol=1e-3)


def test_constant_group_is_exact() -> None:
    weight = torch.full((2, 8), 0.5)
    assert torch.allclose(dequantize_weight(quantize_rtn(weight, bits=2, group_size=4)), weight, atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape, group_size", [((64, 96), 64), ((576, 576), 128), ((7, 13), 4)])
def test_size_model_matches_packed_tensors(bits: int, shape: tuple[int, int], group_size: int) -> None:
    q = quantize_rtn(torch.randn(*shape), bits=bits, group_size=group_size)
    actual = pack_bitstream_int32(q.codes, bits=bits).numel() * 4 + q.scales.numel() * 2 + q.zeros.numel() * 2
    assert quantized_bytes(*shape, bits=bits, group_size=group_size) == actual


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 0, "group_size": 4}, "bits must be between 1 and 8"),
    ({"bits": 4, "group_size": 0}, "group_size must be positive"),
])
def test_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_rtn(torch.randn(2, 4), **kwargs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_is_centred_and_within_half_a_step(bits: int) -> None:
    weight = torch.randn(12, 200, generator=torch.Generator().manual_seed(bits))
    quantized = quantize_rtn(weight, bits=bits, group_size=64, symmetric=True)
    assert torch.all(quantized.zeros == 2 ** (bits - 1))
    error = (dequantize_weight(quantized) - weight).abs()
    step = quantized.scales.float().repeat_interleave(64, dim=1)[:, :200]
    assert torch.all(error <= step / 2 + 1e-6)
    assert torch.equal(dequantize_weight(quantize_rtn(-weight, bits=bits, group_size=64, symmetric=True)),
                       -dequantize_weight(quantized))  # a grid symmetric around 0: Q(-w) = -Q(w)
