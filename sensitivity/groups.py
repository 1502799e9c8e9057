"""Per-group predicted loss increase: the layer-output error of each quantization group on its own.

For group ``(o, j)`` (output row ``o``, input columns ``j*g .. j*g+g-1``) quantized at ``b`` bits, the diagonal
approximation of ``dW H dW^T`` restricted to that group is ``sum_i H_ii dW_oi^2``; weighted like the unit-level
metrics: divided by ``N`` (``output_error``) or scaled by ``0.5 F_o / N^2`` (``fisher_output_error``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantizer.rtn import dequantize_weight, quantize_rtn
from sensitivity.activations import UnitStatistics


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
        delta = dequantize_weight(quantize_rtn(weight, bits=bits, group_size=group_size)).float() - weight
        energy = torch.nn.functional.pad(delta * delta, (0, pad)) * diag
        per_group = energy.reshape(out_features, n_groups, group_size).sum(dim=2) * row_weight[:, None]
        columns.append(per_group.reshape(-1))
    return torch.stack(columns, dim=1)
