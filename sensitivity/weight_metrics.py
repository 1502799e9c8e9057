"""Weight-space predictors of the loss increase of quantizing a unit: GWQ, SliM-LLM salience and BAQ.

All take the calibration statistics of :mod:`sensitivity.activations` (``H = X^T X`` over ``N`` tokens, and for
GWQ the batch weight gradients) and return a predicted increase of the mean per-token loss per bit width.

* ``gwq``: the empirical Fisher of the weights, ``F_ij ~ sum_b (dL_b/dW_ij)^2 / N`` from batch gradients of the
  summed loss, and ``0.5 * sum F * dW^2`` (GWQ ranks weights by gradient; its top 1% are the outliers it keeps
  in high precision, :func:`gradient_outlier_mask`).
* ``slim_salience``: SliM-LLM's salience ``w_ij^2 / [H^-1]_jj^2`` ranks weights; the loss model that goes with it
  (OBS) is ``0.5 * sum dW_ij^2 / [H^-1]_jj`` with ``H`` the per-token input second moment, weighted per output
  channel by the output-gradient energy when it was collected.
* ``baq``: BAQ's Hessian proxy and per-column loss model: uniform quantization noise of variance ``s^2 / 12``
  (``s`` the group's step at ``b`` bits) on every weight, weighted by the column's ``H_jj``, so the predicted
  increase follows ``c * 2^(-2b)`` without quantizing anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bitplan.quantizer.rtn import quantization_error
from bitplan.sensitivity.activations import UnitStatistics

DAMP = 0.01  # relative diagonal damping of H before inversion (GPTQ's default)


def predict_gwq(weight: torch.Tensor, stats: UnitStatistics, *, bits_options: Sequence[int],
                group_size: int) -> dict[int, float]:
    """``0.5 * sum_ij F_ij dW_ij^2`` with the per-token empirical Fisher ``F`` of the weights."""
    if stats.weight_grad_sq is None:
        raise ValueError("gwq needs weight-gradient statistics (collect them with weight_grads=True)")
    fisher = stats.weight_grad_sq / max(stats.tokens, 1)
    return {b: max(0.5 * float((fisher * quantization_error(weight, bits=b, group_size=group_size).pow(2)).sum()), 0.0)
            for b in bits_options}


def gradient_outlier_mask(stats: UnitStatistics, fraction: float = 0.01) -> torch.Tensor:
    """GWQ's outlier map: the ``fraction`` of weights with the largest accumulated gradient magnitude."""
    if stats.weight_grad_abs is None:
        raise ValueError("the outlier map needs weight-gradient statistics (collect them with weight_grads=True)")
    scores = stats.weight_grad_abs.reshape(-1)
    count = max(1, round(fraction * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[torch.topk(scores, count).indices] = True
    return mask.reshape(stats.weight_grad_abs.shape)


def inverse_hessian_diagonal(stats: UnitStatistics, damp: float = DAMP) -> torch.Tensor:
    """``diag((H / N + damp * mean(diag(H / N)) I)^-1)``, in float64."""
    hessian = stats.gram.double() / max(stats.tokens, 1)
    hessian = hessian + damp * hessian.diagonal().mean().clamp_min(1e-12) * torch.eye(hessian.shape[0],
                                                                                      dtype=torch.float64)
    return torch.cholesky_inverse(torch.linalg.cholesky(hessian)).diagonal()


def salience(weight: torch.Tensor, stats: UnitStatistics) -> torch.Tensor:
    """SliM-LLM's element salience ``w_ij^2 / [H^-1]_jj^2``, ``(out_features, in_features)``."""
    return weight.detach().double().pow(2) / inverse_hessian_diagonal(stats).pow(2)[None, :]


def group_salience(weight: torch.Tensor, stats: UnitStatistics, group_size: int) -> torch.Tensor:
    """Salience summed over each group of ``group_size`` input columns, ``(out_features, n_groups)``."""
    values = salience(weight, stats)
    pad = (-values.shape[1]) % group_size
    values = torch.nn.functional.pad(values, (0, pad))
    return values.reshape(values.shape[0], -1, group_size).sum(dim=2)


def predict_slim_salience(weight: torch.Tensor, stats: UnitStatistics, *, bits_options: Sequence[int],
                          group_size: int) -> dict[int, float]:
    """``0.5 * sum_ij w_o dW_ij^2 / [H^-1]_jj`` (OBS), ``w_o`` the per-token output-gradient energy of channel
    ``o`` when collected (else 1)."""
    inverse_diag = inverse_hessian_diagonal(stats)
    rows = torch.ones(weight.shape[0], dtype=torch.float64)
    if stats.output_grad_sq is not None:
        rows = stats.output_grad_sq.double() / max(stats.tokens, 1)
    result = {}
    for bits in bits_options:
        delta = quantization_error(weight, bits=bits, group_size=group_size).double()
        error = (delta.pow(2) / inverse_diag[None, :]).sum(dim=1)
        result[bits] = max(0.5 * float((rows * error).sum()), 0.0)
    return result


def quantization_step(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The RTN step of every weight's group at ``bits``: the group's range (0 included) over ``2^b - 1``,
    ``(out_features, in_features)`` float64."""
    weight = weight.detach().double()
    out_features, in_features = weight.shape
    pad = (-in_features) % group_size
    padded = torch.nn.functional.pad(weight, (0, pad)).reshape(out_features, -1, group_size)
    mask = torch.nn.functional.pad(torch.ones(in_features, dtype=torch.bool), (0, pad)).reshape(1, -1, group_size)
    high = torch.where(mask, padded, -torch.inf).amax(dim=2).clamp_min(0)
    low = torch.where(mask, padded, torch.inf).amin(dim=2).clamp_max(0)
    step = (high - low) / (2**bits - 1)
    return step.repeat_interleave(group_size, dim=1)[:, :in_features]


def predict_baq(weight: torch.Tensor, stats: UnitStatistics, *, bits_options: Sequence[int],
                group_size: int) -> dict[int, float]:
    """``0.5 * sum_ij w_o (H_jj / N) s_ij(b)^2 / 12``, ``s`` the RTN step of the weight's group at ``b`` bits,
    ``w_o`` as in :func:`predict_slim_salience`."""
    rows = torch.ones(weight.shape[0], dtype=torch.float64)
    if stats.output_grad_sq is not None:
        rows = stats.output_grad_sq.double() / max(stats.tokens, 1)
    column_weight = stats.gram.diagonal().double() / max(stats.tokens, 1)
    return {bits: 0.5 * float((rows[:, None] * quantization_step(weight, bits, group_size).pow(2) / 12
                                * column_weight[None, :]).sum())
            for bits in bits_options}
