"""Round-to-nearest, asymmetric, group-wise quantization."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bitplan.kernels.dequant import dequantize_groupwise
from bitplan.quantizer import search_memo
from bitplan.quantizer.grid import (
    expand_row_codes,
    grid_params,
    least_error_grids,
    offset_grid_params,
    refit_offset_grids,
    row_codes,
    salience_calibrated_groups,
    salience_calibrated_params,
    symmetric_grid_params,
    to_codes,
)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes with per-group scales and zero points.

    Attributes:
        codes: ``(out_features, in_features)`` uint8 in ``[0, 2**bits)``.
        scales: ``(out_features, n_groups)`` float16.
        zeros: ``(out_features, n_groups)`` float16, integer-valued (fractional for :func:`quantize_offset`).
        bits: the width of every group (the widest group's when ``group_bits`` is set).
        group_bits: one width per column group (mixed precision inside the layer), or ``None``.
        scale_bits: set when the scales and zeros are themselves stored as codes (:func:`quantize_offset`'s
            double quantization): ``scale_codes`` and ``zero_codes`` ``(out_features, n_groups)`` uint8 of that
            width, ``scale_range`` ``(out_features, 4)`` float16 (scale low and step, zero low and step);
            ``scales`` and ``zeros`` are then what those codes decode to.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    group_bits: tuple[int, ...] | None = None
    scale_bits: int | None = None
    scale_codes: torch.Tensor | None = None
    zero_codes: torch.Tensor | None = None
    scale_range: torch.Tensor | None = None


def _group_view(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the input dimension to whole groups; return ``(out, n_groups, g)`` values and a validity mask."""
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group_size)
    pad = n_groups * group_size - in_features
    padded = torch.nn.functional.pad(weight, (0, pad)).reshape(out_features, n_groups, group_size)
    mask = torch.nn.functional.pad(torch.ones(in_features, dtype=torch.bool), (0, pad), value=False)
    return padded, mask.reshape(1, n_groups, group_size)


def _group_range(groups: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's ``(min, max)`` over its valid columns (the padding of a partial last group left out)."""
    inf = torch.tensor(float("inf"))
    return torch.where(mask, groups, inf).amin(dim=2), torch.where(mask, groups, -inf).amax(dim=2)


def check_quantization_args(weight: torch.Tensor, bits: int, group_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")


def quantize_rtn(weight: torch.Tensor, *, bits: int, group_size: int,
                 salience: torch.Tensor | None = None, symmetric: bool = False) -> QuantizedWeight:
    """Quantize each group of ``group_size`` input columns to ``bits`` bits, asymmetric.

    The range ``[min, max]`` of each group is widened to include 0 (as GPTQ does), so the zero point is an
    integer code in ``[0, 2**bits)``: ``scale = (max - min) / (2**bits - 1)`` (stored fp16),
    ``zero = round(-min / scale)``, ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``. With ``salience``
    (``(in_features,)``, for example the Hessian diagonal), each group's range is instead searched to minimize
    the salience-weighted error (:func:`quantizer.grid.salience_calibrated_params`, SliM-LLM's calibration).
    ``symmetric``: the grid is symmetric around 0 with the fixed zero point ``2**(bits-1)`` and
    ``scale = max|w| / (2**(bits-1) - 1)`` (same packed format).

    Args:
        weight: ``(out_features, in_features)`` float.
    """
    check_quantization_args(weight, bits, group_size)
    w = weight.detach().float()
    if salience is not None:
        if symmetric:
            raise ValueError("the salience-weighted range search fits asymmetric grids")
        return _quantize_rtn_calibrated(w, bits, group_size, salience.float())
    groups, mask = _group_view(w, group_size)
    low, high = _group_range(groups, mask)
    if symmetric:
        scale, zeros = symmetric_grid_params(torch.maximum(low.abs(), high.abs()), bits)
    else:
        scale, zeros = grid_params(low, high, bits)
    codes = to_codes(groups, scale.unsqueeze(2), zeros.unsqueeze(2), bits)
    codes = codes.reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scale.to(torch.float16), zeros=zeros.to(torch.float16), bits=bits,
                           group_size=group_size)


def quantize_offset(weight: torch.Tensor, *, bits: int, group_size: int, scale_bits: int | None = None,
                    importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Round to nearest on each group's own ``[min, max]`` with an fp16 scale and an fp16 *fractional* zero point
    (:func:`quantizer.grid.offset_grid_params`, llama.cpp's ``Q4_1`` arithmetic): ``q = clamp(round(w / scale +
    zero), 0, 2**bits - 1)``, decoded ``(q - zero) * scale`` like every packed grid (same bytes as the integer
    zero point). A weight already on such a grid (a ``Q4_1`` source at 4 bits in groups of 32) comes back to
    fp16's rounding of the offset.

    ``scale_bits``: the scales and the zeros are stored as ``scale_bits``-bit codes on each row's own linear grid
    (:func:`quantizer.grid.row_codes`, double quantization), the weight's codes rounded against the decoded
    ones: a group of 32 for a quarter of a bit per weight at 4 (against half a bit for two fp16 values per 32).

    ``importance`` (``(in_features,)``, non-negative: the layer's per-column input energy): each group's range is
    searched instead of taken whole and then refit (:func:`offset_search`), the scale and zero searched before they
    are double-quantized; the search is done once per weight, importance, width and group size while
    :mod:`quantizer.search_memo` keeps it (``-fzero``, ``-dq4`` and ``-dq6`` share it; the same bytes)."""
    check_quantization_args(weight, bits, group_size)
    w = weight.detach().float()
    groups, mask = _group_view(w, group_size)
    low, high = _group_range(groups, mask)
    if importance is None:
        scale, zeros = offset_grid_params(low, high, bits)
    else:
        column_weights = torch.nn.functional.pad(importance.detach().float(), (0, groups.shape[1] * group_size
                                                                               - w.shape[1]))
        weights = column_weights.reshape(1, -1, group_size)
        if search_memo.enabled():  # the same weight's grid at the same width: once for -fzero, -dq4, -dq6
            key = ("offset", search_memo.digest(w, weights), bits, group_size)
            scale, zeros = search_memo.SEARCHES.get(
                key, lambda: offset_search(groups, low, high, bits, weights))
        else:
            scale, zeros = offset_search(groups, low, high, bits, weights)
    scale_codes = zero_codes = scale_range = None
    if scale_bits is not None:
        scale_codes, scale_low, scale_step = row_codes(scale, scale_bits)
        zero_codes, zero_low, zero_step = row_codes(zeros, scale_bits)
        scale = expand_row_codes(scale_codes, scale_low, scale_step).float()
        zeros = expand_row_codes(zero_codes, zero_low, zero_step).float()
        scale_range = torch.stack([scale_low, scale_step, zero_low, zero_step], dim=1).to(torch.float16)
    codes = (groups / scale.unsqueeze(2)).add_(zeros.unsqueeze(2)).round_().clamp_(0, (1 << bits) - 1)
    codes = codes.reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scale.to(torch.float16), zeros=zeros.to(torch.float16), bits=bits,
                           group_size=group_size, scale_bits=scale_bits, scale_codes=scale_codes,
                           zero_codes=zero_codes, scale_range=scale_range)


OFFSET_TRIMS = (0.0, 0.03, 0.06, 0.1, 0.15, 0.2)  # fractions of a group's range taken off its low or its high end


def offset_search(groups: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, weights: torch.Tensor,
                  trims: tuple[float, ...] = OFFSET_TRIMS) -> tuple[torch.Tensor, torch.Tensor]:
    """The fractional-zero grid of each group that rounds it with the least ``weights``-weighted squared error,
    among the grids spanning ``[low + a * r, high - b * r]`` (``r = high - low``) for every ``a``, ``b`` in
    ``trims``: clipping a group's few outlying weights buys a finer step for the rest, llama.cpp's
    ``make_qkx2_quants`` idea for ``Q4_1``/``Q4_K`` with a grid of candidates instead of its iterations. The
    whole range comes first and is kept on ties, so a weight already on such a grid keeps it. The grid found is
    then refit to its codes by weighted least squares (:func:`quantizer.grid.refit_offset_grids`, kept only where
    it lowers the error).

    Args:
        groups: ``(rows, n_groups, group_size)`` float32 (a padded last group's padding weighted 0).
        low, high: ``(rows, n_groups)`` each group's min and max.
        weights: ``(1, n_groups, group_size)`` non-negative, 0 on padding.
    Returns:
        ``(scale, zero)``, each ``(rows, n_groups)``, as :func:`quantizer.grid.offset_grid_params` gives them.
    """
    def trimmed(chunk: slice) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = low[chunk].unsqueeze(2), high[chunk].unsqueeze(2)
        span = hi - lo
        for cut_low in trims:
            for cut_high in trims:
                if cut_low + cut_high < 1.0:
                    yield offset_grid_params(lo + cut_low * span, hi - cut_high * span, bits)

    scale, zero = least_error_grids(groups, weights, bits, trimmed, fractional_zero=True)
    return refit_offset_grids(groups, weights, bits, scale, zero)


def _quantize_rtn_calibrated(w: torch.Tensor, bits: int, group_size: int, salience: torch.Tensor
                             ) -> QuantizedWeight:
    full = w.shape[1] - w.shape[1] % group_size  # the full groups are searched at once; a narrower last one alone
    if search_memo.enabled():  # the quantize step encodes again what the weight errors encoded: searched once
        key = ("salience", search_memo.digest(w[:, :full], salience[:full]), bits, group_size)
        scale, zero = search_memo.SEARCHES.get(
            key, lambda: salience_calibrated_groups(w[:, :full], bits, group_size, salience[:full]))
    else:
        scale, zero = salience_calibrated_groups(w[:, :full], bits, group_size, salience[:full])
    if full < w.shape[1]:
        last_scale, last_zero = salience_calibrated_params(w[:, full:], bits, salience[full:])
        scale, zero = torch.cat([scale, last_scale], dim=1), torch.cat([zero, last_zero], dim=1)
    groups = full // group_size
    codes = torch.empty(w.shape, dtype=torch.uint8)
    codes[:, :full] = to_codes(w[:, :full].reshape(w.shape[0], groups, group_size), scale[:, :groups, None],
                               zero[:, :groups, None], bits).reshape(w.shape[0], full)
    if full < w.shape[1]:
        codes[:, full:] = to_codes(w[:, full:], scale[:, groups:], zero[:, groups:], bits)
    return QuantizedWeight(codes=codes, scales=scale.half(), zeros=zero.half(), bits=bits, group_size=group_size)


def quantization_error(weight: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """``dW = Q(W) - W``: the float32 error of RTN-quantizing ``weight`` at ``bits`` (every predictor's input)."""
    weight = weight.detach().float()
    return dequantize_weight(quantize_rtn(weight, bits=bits, group_size=group_size)) - weight


def dequantize_weight(quantized: QuantizedWeight) -> torch.Tensor:
    """The float32 weight the codes stand for."""
    return dequantize_groupwise(quantized.codes, quantized.scales, quantized.zeros,
                                group_size=quantized.group_size)
