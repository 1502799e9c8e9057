"""Per-group predicted loss increase, for allocation inside a layer (every group its own unit).

A group ``(o, j)`` is output row ``o`` and input columns ``j*g .. j*g+g-1``. :func:`group_sensitivity` gives, for
the metrics whose loss model is a sum over weights, each group's share (the shares add up to the unit-level
prediction): ``gwq``, ``slim_salience`` and ``baq``. For the output-error metrics, whose ``dW H dW^T`` couples the
columns, :func:`group_output_error` uses its diagonal ``sum_i H_ii dW_oi^2`` restricted to the group, weighted
like the unit-level metric: divided by ``N`` (``output_error``) or by ``0.5 F_o / N^2`` (``fisher_output_error``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bitplan.quantizer.rtn import quantization_error
from bitplan.sensitivity.activations import UnitStatistics


def group_output_error(weight: torch.Tensor, stats: UnitStatistics, *, bits_options: Sequence[int], group_size: int,
                       fisher: bool) -> torch.Tensor:
    """``(out_features * n_groups, len(bits_options))`` predicted loss increase per group (row-major groups)."""
    weight = weight.detach().float()
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group_size)
    pad = n_groups * group_size - in_features
    tokens = max(stats.tokens, 1)
    diag = torch.nn.functional.pad(stats.gram.diagonal().float(), (0, pad))
    if fisher:
        if stats.output_grad_sq is None:
            raise ValueError("fisher weighting needs output gradients; collect statistics with a loss function")
        row_weight = 0.5 * stats.output_grad_sq.float() / tokens / tokens
    else:
        row_weight = torch.full((out_features,), 1.0 / tokens)
    columns = []
    for bits in bits_options:
        delta = quantization_error(weight, bits=bits, group_size=group_size)
        energy = torch.nn.functional.pad(delta * delta, (0, pad)) * diag
        per_group = energy.reshape(out_features, n_groups, group_size).sum(dim=2) * row_weight[:, None]
        columns.append(per_group.reshape(-1))
    return torch.stack(columns, dim=1)


def _group_sum(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(out, in)`` per-weight values summed over each group: ``(out * n_groups,)``, row-major."""
    pad = (-values.shape[1]) % group_size
    padded = torch.nn.functional.pad(values, (0, pad))
    return padded.reshape(values.shape[0], -1, group_size).sum(dim=2).reshape(-1)


def group_sensitivity(metric: str, weight: torch.Tensor, stats: UnitStatistics, *, bits_options: Sequence[int],
                      group_size: int) -> torch.Tensor:
    """``(out_features * n_groups, len(bits_options))`` predicted loss increase per group under ``metric``
    (``output_error``, ``fisher_output_error``, ``gwq``, ``slim_salience`` or ``baq``)."""
    if metric in ("output_error", "fisher_output_error"):
        return group_output_error(weight, stats, bits_options=bits_options, group_size=group_size,
                                  fisher=metric == "fisher_output_error")
    from bitplan.sensitivity.weight_metrics import inverse_hessian_diagonal, quantization_step

    tokens = max(stats.tokens, 1)
    weight = weight.detach().double()
    rows = torch.ones(weight.shape[0], dtype=torch.float64)
    if stats.output_grad_sq is not None:
        rows = stats.output_grad_sq.double() / tokens
    columns = []
    for bits in bits_options:
        if metric == "gwq":
            if stats.weight_grad_sq is None:
                raise ValueError("gwq needs weight-gradient statistics (collect them with weight_grads=True)")
            delta = quantization_error(weight, bits=bits, group_size=group_size).double()
            values = 0.5 * stats.weight_grad_sq.double() / tokens * delta.pow(2)
        elif metric == "slim_salience":
            delta = quantization_error(weight, bits=bits, group_size=group_size).double()
            values = 0.5 * rows[:, None] * delta.pow(2) / inverse_hessian_diagonal(stats)[None, :]
        elif metric == "baq":
            step = quantization_step(weight, bits, group_size)
            values = 0.5 * rows[:, None] * step.pow(2) / 12 * (stats.gram.diagonal().double() / tokens)[None, :]
        else:
            raise ValueError(f"no per-group model for metric {metric!r}")
        columns.append(_group_sum(values, group_size))
    return torch.stack(columns, dim=1)
