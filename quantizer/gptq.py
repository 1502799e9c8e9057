"""GPTQ (Frantar et al. 2022) with a bit width per column group (SliM-LLM's variant) and optional
salience-weighted range calibration of every group (SliM-LLM's quantizer calibration).

Columns are quantized left to right; each one's rounding error is spread over the columns not yet quantized
through the upper Cholesky factor of the inverse damped Hessian ``H = sum_t x_t x_t^T``, so that the layer
output error ``||X (W - Q)^T||^2`` stays small. A group's grid (scale, zero) is fitted when the sweep reaches
its first column, from the weights as updated by then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitplan.quantizer.grid import grid_params, salience_calibrated_params, symmetric_grid_params, to_codes
from bitplan.quantizer.rtn import QuantizedWeight, check_quantization_args


@dataclass(frozen=True)
class GPTQConfig:
    """Attributes:
        damp: added to the Hessian diagonal, as a fraction of its mean (the reference code's ``percdamp``).
        block_size: columns updated together (lazy batch updates); a multiple of the group size is rounded to.
        salience: fit each group's range by the salience-weighted search instead of min/max.
        act_order: quantize columns in decreasing order of ``H_jj`` (the reference code's ``act_order``), with
            every group's grid fitted up front from the original weights (its ``static_groups``), so the groups
            stay contiguous column ranges in the packed format.
        symmetric: each group's grid symmetric around 0 (scale from ``max |w|``), as the symmetric integer
            formats store it; not with ``salience`` (its range search fits asymmetric grids).
    """

    damp: float = 0.01
    block_size: int = 128
    salience: bool = False
    act_order: bool = True
    symmetric: bool = False  # grids symmetric around 0 (fixed zero point ``2**(bits-1)``), as ``int{b}-g{g}-sym``


def inverse_hessian_factor(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` and the mask of dead (never active) inputs."""
    hessian = gram.detach().double().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(damp * float(torch.diag(hessian).mean()))
    lower = torch.linalg.cholesky(hessian)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


def _fit_grid(values: torch.Tensor, bits: int, salience: torch.Tensor | None,
              symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``(rows,)`` of one column group: min/max, symmetric ``max |w|``, or the salience-weighted
    range search."""
    if symmetric:
        return symmetric_grid_params(values.abs().amax(dim=1), bits)
    if salience is None:
        return grid_params(values.amin(dim=1), values.amax(dim=1), bits)
    scale, zero = salience_calibrated_params(values, bits, salience)
    return scale.squeeze(1), zero.squeeze(1)


def _group_widths(weight: torch.Tensor, gram: torch.Tensor, *, bits: int, group_size: int,
                  group_bits: Sequence[int] | None, config: GPTQConfig) -> list[int]:
    """Check :func:`quantize_gptq`'s arguments (a ``ValueError`` that says how to fix them); each group's width."""
    check_quantization_args(weight, bits, group_size)
    in_features = weight.shape[1]
    n_groups = -(-in_features // group_size)
    widths = [bits] * n_groups if group_bits is None else [int(b) for b in group_bits]
    if len(widths) != n_groups or any(not 1 <= b <= 8 for b in widths):
        raise ValueError(f"group_bits must give {n_groups} widths between 1 and 8, got {list(widths)}")
    if gram.shape != (in_features, in_features):
        raise ValueError(f"gram must be ({in_features}, {in_features}), got {tuple(gram.shape)}")
    if config.symmetric and config.salience:
        raise ValueError("the salience-weighted range search fits asymmetric grids, not symmetric ones")
    return widths


def quantize_gptq(weight: torch.Tensor, gram: torch.Tensor, *, bits: int, group_size: int,
                  group_bits: Sequence[int] | None = None, config: GPTQConfig = GPTQConfig()) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` with per-group asymmetric grids.

    Args:
        weight: ``(out_features, in_features)``.
        gram: ``(in_features, in_features)`` input Gram matrix ``sum_t x_t x_t^T`` from calibration.
        bits: the width of every group, unless ``group_bits`` gives one per column group.
        group_bits: ``ceil(in_features / group_size)`` widths (mixed precision inside the layer).
    """
    widths = _group_widths(weight, gram, bits=bits, group_size=group_size, group_bits=group_bits, config=config)
    out_features, in_features = weight.shape
    n_groups = len(widths)
    w = weight.detach().float().clone()
    salience = torch.diag(gram).float() if config.salience else None
    order = torch.argsort(torch.diag(gram), descending=True, stable=True) if config.act_order else None
    if order is not None:
        gram = gram[order][:, order]
    factor, dead = inverse_hessian_factor(gram, config.damp)
    scales = torch.zeros(out_features, n_groups)
    zeros = torch.zeros(out_features, n_groups)
    if order is not None:  # static groups: every grid from the original weights, then the columns reordered
        for group in range(n_groups):
            columns = slice(group * group_size, (group + 1) * group_size)
            scales[:, group], zeros[:, group] = _fit_grid(w[:, columns], widths[group],
                                                          None if salience is None else salience[columns],
                                                          config.symmetric)
        w = w[:, order]
    w[:, dead] = 0.0
    group_of = (torch.arange(in_features) if order is None else order) // group_size
    block = max(group_size, (config.block_size // group_size) * group_size)
    codes = torch.zeros(out_features, in_features)
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block = w[:, start:stop].clone()
        err_block = torch.zeros_like(w_block)
        h_block = factor[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            group = int(group_of[column])
            b = widths[group]
            if order is None and column % group_size == 0:  # fit the group's grid when the sweep reaches it
                values = w_block[:, i : i + group_size]
                scales[:, group], zeros[:, group] = _fit_grid(
                    values, b, None if salience is None else salience[column : column + values.shape[1]],
                    config.symmetric)
            scale, zero = scales[:, group], zeros[:, group]
            q = to_codes(w_block[:, i], scale, zero, b)
            codes[:, column] = q
            err = (w_block[:, i] - (q - zero) * scale) / h_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, stop:] -= err_block @ factor[start:stop, stop:]
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    return QuantizedWeight(codes=codes.to(torch.uint8), scales=scales.half(), zeros=zeros.half(), bits=max(widths),
                           group_size=group_size, group_bits=None if group_bits is None else tuple(widths))
