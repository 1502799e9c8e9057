"""GPTQ against a slow textbook version, against RTN, and the salience-weighted calibration."""

from __future__ import annotations

import pytest
import torch

from bitplan.quantizer.gptq import GPTQConfig, quantize_gptq
from bitplan.quantizer.grid import grid_params, salience_calibrated_params, symmetric_grid_params, to_codes
from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    return torch.randn(tokens, features, generator=generator) @ (torch.eye(features) + mixing)


def textbook_gptq(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, damp: float,
                  group_bits: list[int] | None = None, act_order: bool = False,
                  symmetric: bool = False) -> torch.Tensor:
    """Column by column with the explicit inverse Hessian, downdated after each column. With ``act_order`` the
    columns go in decreasing ``H_jj`` order and every group's grid comes from the original weights first;
    ``symmetric``: each grid spans ``-max|w| .. max|w|`` around the zero point ``2**(bits-1)``."""

    def grid(values: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if symmetric:
            return symmetric_grid_params(values.abs().amax(dim=1), width)
        return grid_params(values.amin(dim=1), values.amax(dim=1), width)

    w = weight.double().clone()
    h = gram.double().clone()
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    h_inv = torch.linalg.inv(h)
    result = torch.zeros_like(w)
    width = [bits if group_bits is None else group_bits[j // group_size] for j in range(w.shape[1])]
    grids = {}
    if act_order:
        order = torch.argsort(torch.diag(gram), descending=True, stable=True).tolist()
        for start in range(0, w.shape[1], group_size):
            grids[start // group_size] = grid(w[:, start : start + group_size].float(), width[start])
    else:
        order = list(range(w.shape[1]))
    remaining = list(order)
    for j in order:
        group = j // group_size
        if not act_order and j % group_size == 0:
            grids[group] = grid(w[:, j : j + group_size].float(), width[j])
        scale, zero = (t.double() for t in grids[group])
        q = ((to_codes(w[:, j].float(), scale.float(), zero.float(), width[j]).double()) - zero) * scale
        result[:, j] = q
        err = (w[:, j] - q) / h_inv[j, j]
        remaining.remove(j)
        w[:, remaining] -= err.unsqueeze(1) * h_inv[j, remaining].unsqueeze(0)
        h_inv = h_inv - torch.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
    return result.float()


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (approx - weight).T).pow(2).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group_size", "group_bits"), [(3, 16, None), (4, 32, None), (2, 16, [2, 4, 3, 8])])
def test_gptq_matches_textbook_version(bits: int, group_size: int, group_bits: list[int] | None,
                                       act_order: bool) -> None:
    torch.manual_seed(1)
    x = correlated_inputs(256, 64) * torch.linspace(0.2, 3.0, 64)
    weight = torch.randn(24, 64)
    gram = x.T @ x
    fast = quantize_gptq(weight, gram, bits=bits, group_size=group_size, group_bits=group_bits,
                         config=GPTQConfig(damp=0.01, block_size=32, act_order=act_order))
    slow = textbook_gptq(weight, gram, bits, group_size, 0.01, group_bits, act_order)
    fast_w = dequantize_weight(fast)
    mismatched = (fast_w - slow).abs() > 1e-3
    assert mismatched.float().mean() < 0.01  # only rounding ties may flip between the two orders of operations
    assert output_error(weight, fast_w, x) == pytest.approx(output_error(weight, slow, x), rel=0.02)
    if group_bits is not None:
        assert fast.group_bits == tuple(group_bits)
        for group, b in enumerate(group_bits):
            assert int(fast.codes[:, group * group_size : (group + 1) * group_size].max()) < 1 << b


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group_size"), [(3, 16), (4, 32), (8, 64)])
def test_symmetric_gptq_matches_textbook_version(bits: int, group_size: int, act_order: bool) -> None:
    """The symmetric grids (``int{b}-g{g}-sym``, the compressed-tensors target's) against the textbook loop."""
    torch.manual_seed(2)
    x = correlated_inputs(256, 64) * torch.linspace(0.2, 3.0, 64)
    weight = torch.randn(24, 64)
    gram = x.T @ x
    fast = quantize_gptq(weight, gram, bits=bits, group_size=group_size,
                         config=GPTQConfig(damp=0.01, block_size=32, act_order=act_order, symmetric=True))
    assert torch.all(fast.zeros == float(1 << (bits - 1)))
    slow = textbook_gptq(weight, gram, bits, group_size, 0.01, act_order=act_order, symmetric=True)
    fast_w = dequantize_weight(fast)
    assert ((fast_w - slow).abs() > 1e-3).float().mean() < 0.01
    assert output_error(weight, fast_w, x) == pytest.approx(output_error(weight, slow, x), rel=0.02)
    rtn = dequantize_weight(quantize_rtn(weight, bits=bits, group_size=group_size, symmetric=True))
    assert output_error(weight, fast_w, x) < output_error(weight, rtn, x)


def test_gptq_with_a_diagonal_hessian_is_rtn() -> None:
    weight = torch.randn(16, 96)
    gram = torch.diag(torch.rand(96) + 0.5)
    gptq = quantize_gptq(weight, gram, bits=3, group_size=32, config=GPTQConfig(act_order=False))
    rtn = quantize_rtn(weight, bits=3, group_size=32)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_cuts_the_layer_output_error_of_rtn(bits: int) -> None:
    x = correlated_inputs(512, 128, seed=3)
    weight = torch.randn(32, 128)
    gram = x.T @ x
    rtn = dequantize_weight(quantize_rtn(weight, bits=bits, group_size=32))
    gptq = dequantize_weight(quantize_gptq(weight, gram, bits=bits, group_size=32))
    assert output_error(weight, gptq, x) < 0.8 * output_error(weight, rtn, x)


def test_dead_inputs_are_zeroed_and_do_not_break_the_factorization() -> None:
    x = correlated_inputs(128, 32)
    x[:, 5] = 0.0
    quantized = quantize_gptq(torch.randn(8, 32), x.T @ x, bits=4, group_size=16)
    assert torch.isfinite(dequantize_weight(quantized)).all()
    assert torch.all(dequantize_weight(quantized)[:, 5].abs() < quantized.scales.float()[:, 0])


def test_salience_calibration_never_loses_to_min_max_on_its_own_objective() -> None:
    torch.manual_seed(4)
    values = torch.randn(64, 32) * torch.linspace(0.2, 3.0, 32)
    values[:, 3] *= 8  # an outlier column
    salience = torch.rand(32) + 0.1
    for bits in (2, 3, 4):
        scale, zero = salience_calibrated_params(values, bits, salience)
        plain_scale, plain_zero = grid_params(values.amin(dim=1, keepdim=True), values.amax(dim=1, keepdim=True),
                                              bits)

        def weighted_error(s: torch.Tensor, z: torch.Tensor, b: int = bits) -> torch.Tensor:
            return (((to_codes(values, s, z, b) - z) * s - values).pow(2) * salience).sum(dim=1)

        calibrated, plain = weighted_error(scale, zero), weighted_error(plain_scale, plain_zero)
        assert torch.all(calibrated <= plain + 1e-6)
        assert float(calibrated.sum()) < float(plain.sum())  # the search found a better range for some rows


def test_calibrated_rtn_and_gptq_keep_codes_in_range() -> None:
    x = correlated_inputs(128, 80)
    weight = torch.randn(12, 80)
    for quantized in (quantize_rtn(weight, bits=3, group_size=32, salience=torch.diag(x.T @ x)),
                      quantize_gptq(weight, x.T @ x, bits=3, group_size=32, config=GPTQConfig(salience=True))):
        assert quantized.codes.shape == weight.shape and int(quantized.codes.max()) <= 7
        assert quantized.scales.shape == (12, 3)


def test_act_order_with_a_diagonal_hessian_is_rtn_and_with_correlations_beats_it() -> None:
    weight = torch.randn(16, 96)
    gram = torch.diag(torch.rand(96) + 0.5)
    ordered = quantize_gptq(weight, gram, bits=3, group_size=32, config=GPTQConfig(act_order=True))
    rtn = quantize_rtn(weight, bits=3, group_size=32)
    assert torch.equal(ordered.codes, rtn.codes) and torch.equal(ordered.scales, rtn.scales)
    x = correlated_inputs(512, 128, seed=5) * torch.linspace(0.1, 4.0, 128)  # uneven input energies
    weight = torch.randn(32, 128)
    gram = x.T @ x
    ordered = dequantize_weight(quantize_gptq(weight, gram, bits=3, group_size=32, config=GPTQConfig(act_order=True)))
    plain = dequantize_weight(quantize_rtn(weight, bits=3, group_size=32))
    assert output_error(weight, ordered, x) < 0.8 * output_error(weight, plain, x)
