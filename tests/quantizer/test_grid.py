"""The salience-weighted range search over every group at once against the one-group reference."""

from __future__ import annotations

import pytest
import torch

from bitplan.quantizer import grid
from bitplan.quantizer.grid import salience_calibrated_groups, salience_calibrated_params, to_codes
from bitplan.quantizer.rtn import quantize_rtn


def reference_search(weight: torch.Tensor, bits: int, group_size: int, salience: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of the documented per-group search per group of columns (a narrower last group included)."""
    pairs = [salience_calibrated_params(weight[:, start:start + group_size], bits, salience[start:start + group_size])
             for start in range(0, weight.shape[1], group_size)]
    return torch.cat([s for s, _ in pairs], dim=1), torch.cat([z for _, z in pairs], dim=1)


def heavy_tailed(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    weight[torch.rand(rows, columns, generator=generator) < 0.01] *= 12  # outliers make the search shrink
    salience = torch.rand(columns, generator=generator) ** 4 * 50 + 1e-3
    return weight, salience


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_every_group_at_once_is_bit_identical_to_one_group_at_a_time(bits: int, group_size: int) -> None:
    weight, salience = heavy_tailed(96, 384, seed=bits * 1000 + group_size)
    scale, zero = salience_calibrated_groups(weight, bits, group_size, salience)
    expected_scale, expected_zero = reference_search(weight, bits, group_size, salience)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(zero, expected_zero)
    shrunk = scale * ((1 << bits) - 1) < (weight.reshape(96, -1, group_size).amax(2) -
                                          weight.reshape(96, -1, group_size).amin(2).clamp(max=0)) * 0.99
    assert shrunk.any()  # the search did move some ranges, so the comparison covers more than min-max


def test_row_chunks_give_the_same_search(monkeypatch: pytest.MonkeyPatch) -> None:
    weight, salience = heavy_tailed(50, 256, seed=7)
    whole = salience_calibrated_groups(weight, 3, 32, salience)
    monkeypatch.setattr(grid, "SEARCH_CHUNK_ELEMENTS", 3 * 256)  # three rows at a time, a shorter last chunk
    chunked = salience_calibrated_groups(weight, 3, 32, salience)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))


@pytest.mark.parametrize("columns", [256, 200])  # 200: a last group of 8 columns
def test_quantize_rtn_with_salience_matches_the_per_group_reference(columns: int) -> None:
    weight, salience = heavy_tailed(40, columns, seed=columns)
    quantized = quantize_rtn(weight, bits=3, group_size=64, salience=salience)
    scale, zero = reference_search(weight, 3, 64, salience)
    codes = torch.cat([to_codes(weight[:, start:start + 64], scale[:, [i]], zero[:, [i]], 3)
                       for i, start in enumerate(range(0, columns, 64))], dim=1)
    assert torch.equal(quantized.scales, scale.half())
    assert torch.equal(quantized.zeros, zero.half())
    assert torch.equal(quantized.codes, codes.to(torch.uint8))


def test_shapes_that_do_not_fit_are_refused() -> None:
    weight, salience = heavy_tailed(4, 96, seed=1)
    with pytest.raises(ValueError, match="groups of 64"):
        salience_calibrated_groups(weight, 3, 64, salience)
    with pytest.raises(ValueError, match="salience"):
        salience_calibrated_groups(weight, 3, 32, salience[:32])


@pytest.mark.parametrize("columns, group_size", [(256, 64), (200, 64), (96, 32)])
def test_dequantize_groupwise_against_the_elementwise_formula(columns: int, group_size: int) -> None:
    """The grouped, in-place dequantization (full groups) and the repeated one (a ragged last group) against
    ``W[o, j] = (q[o, j] - zero[o, j // g]) * scale[o, j // g]`` written out element by element."""
    from bitplan.kernels.dequant import dequantize_groupwise

    generator = torch.Generator().manual_seed(columns)
    groups = -(-columns // group_size)
    codes = torch.randint(0, 16, (5, columns), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(5, groups, generator=generator) * 0.1).half()
    zeros = torch.randint(0, 16, (5, groups), generator=generator).half()
    expected = torch.tensor([[(float(codes[o, j]) - float(zeros[o, j // group_size]))
                              * float(scales[o, j // group_size]) for j in range(columns)] for o in range(5)])
    assert torch.equal(dequantize_groupwise(codes, scales, zeros, group_size=group_size), expected)
    as_float = codes.float()  # float codes, or a transposed view: computed on a copy, the input left alone
    assert torch.equal(dequantize_groupwise(as_float, scales, zeros, group_size=group_size), expected)
    assert torch.equal(as_float, codes.float())
    transposed = codes.T.contiguous().T
    assert torch.equal(dequantize_groupwise(transposed, scales, zeros, group_size=group_size), expected)


def test_to_codes_leaves_its_inputs_alone() -> None:
    values = torch.tensor([[-0.31, 0.02, 0.29, 0.9]])
    scale, zero = torch.tensor([[0.1]]), torch.tensor([[3.0]])
    before = values.clone()
    assert to_codes(values, scale, zero, 3).tolist() == [[0.0, 3.0, 6.0, 7.0]]
    assert torch.equal(values, before)
    wide_zero = torch.tensor([[3.0], [4.0]])  # broadcast wider than the values
    assert to_codes(values, scale, wide_zero, 3).tolist() == [[0.0, 3.0, 6.0, 7.0], [1.0, 4.0, 7.0, 7.0]]
