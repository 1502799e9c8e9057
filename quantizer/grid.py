"""The asymmetric integer grid of one group and SliM-LLM's salience-weighted search for its range."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

# The decoder of :func:`row_codes` lives with the loader's kernels (kernels sit below the quantizer); the encoder
# re-exports it so both sides name one function.
from bitplan.kernels.dequant import expand_row_codes as expand_row_codes

CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(13))  # shrink factors of the [min, max] range, 1.0 .. 0.7


def grid_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable, float32) and integer zero point of the grid spanning ``[low, high]``.

    The range is widened to include 0 so that the zero point is a code in ``[0, 2**bits)``:
    ``scale = (high - low) / (2**bits - 1)`` rounded to fp16, ``zero = round(-low / scale)``.
    """
    max_code = (1 << bits) - 1
    low = low.clamp(max=0.0)
    high = high.clamp(min=0.0)
    scale = ((high - low) / max_code).clamp(min=1e-8).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # fp16 underflow of tiny ranges
    zero = torch.round(-low / scale).clamp(0, max_code)
    return scale, zero


OFFSET_ZERO_LIMIT = 256.0  # fp16 holds a fractional zero to 1/8 of a code up to here


def offset_grid_params(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and *fractional* zero point of the grid spanning exactly ``[low, high]`` (not widened to include 0):
    ``scale = (high - low) / (2**bits - 1)`` and ``zero = -low / scale``, each rounded to fp16, decoded as
    ``(code - zero) * scale``: llama.cpp's ``Q4_1`` arithmetic (``w = d * q + m`` with ``m = -zero * scale``) in
    our packed layout. A group whose range lies so far from 0 that fp16 would round its zero by more than an
    eighth of a code (``|zero| > OFFSET_ZERO_LIMIT``) takes the integer grid of :func:`grid_params` instead."""
    max_code = (1 << bits) - 1
    scale = ((high - low) / max_code).clamp(min=1e-8).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    zero = -low / scale
    far = ~(zero.abs() <= OFFSET_ZERO_LIMIT)  # NaN-safe
    if bool(far.any()):
        int_scale, int_zero = grid_params(low, high, bits)
        scale, zero = torch.where(far, int_scale, scale), torch.where(far, int_zero, zero)
    return scale, zero.to(torch.float16).float()


OFFSET_REFITS = 2  # least-squares refits of a searched fractional-zero grid (each kept only where it lowers the error)


def refit_offset_grids(groups: torch.Tensor, weights: torch.Tensor, bits: int, scale: torch.Tensor,
                       zero: torch.Tensor, rounds: int = OFFSET_REFITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit each group's fractional-zero grid to the codes it gives: with ``q`` the codes of ``(scale, zero)``,
    the scale ``d`` and offset ``m`` that minimize ``sum_j weights_j (d * q_j + m - w_j) ** 2`` (a 2x2 linear
    system per group), stored as :func:`offset_grid_params` stores a grid (``d`` in fp16, ``zero = -m / d`` in
    fp16) and kept only where it rounds the group with strictly less weighted error; ``rounds`` times, each with
    the codes of the grid kept (llama.cpp's ``make_qkx2_quants`` step after its range search). A group whose
    codes are all equal, whose fit has ``d <= 0`` or whose zero lies past ``OFFSET_ZERO_LIMIT`` keeps its grid.

    Args:
        groups: ``(rows, n_groups, group_size)`` float32.
        weights: broadcastable to ``groups``, non-negative.
        scale, zero: ``(rows, n_groups)``, an :func:`offset_grid_params` grid per group.
    Returns:
        ``(scale, zero)``, each ``(rows, n_groups)``.
    """
    for _ in range(rounds):
        scale, zero = least_error_grids(groups, weights, bits, _kept_or_fitted(groups, weights, bits, scale, zero),
                                        fractional_zero=True)
    return scale, zero


def _kept_or_fitted(groups: torch.Tensor, weights: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor
                    ) -> Callable[[slice], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`least_error_grids` candidates for one refit: each group's grid, then its least-squares fit (the
    grid itself where the fit is degenerate, so that it ties and the grid is kept)."""
    max_code = (1 << bits) - 1

    def candidates(chunk: slice) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        values, s, z = groups[chunk], scale[chunk].unsqueeze(2), zero[chunk].unsqueeze(2)
        yield s, z
        codes = (values / s + z).round_().clamp_(0, max_code)
        weighted = codes * weights
        total = weights.expand_as(values).sum(dim=2, keepdim=True)
        q_sum = weighted.sum(dim=2, keepdim=True)
        qq_sum = (weighted * codes).sum(dim=2, keepdim=True)
        qx_sum = (weighted * values).sum(dim=2, keepdim=True)
        x_sum = (values * weights).sum(dim=2, keepdim=True)
        det = total * qq_sum - q_sum * q_sum
        fit = det > 0
        det = torch.where(fit, det, torch.ones_like(det))
        new_scale = ((total * qx_sum - q_sum * x_sum) / det).to(torch.float16).float()
        offset = (qq_sum * x_sum - q_sum * qx_sum) / det
        fit &= new_scale > 0
        new_scale = torch.where(fit, new_scale, s)
        new_zero = (-offset / new_scale).to(torch.float16).float()
        fit &= new_zero.abs() <= OFFSET_ZERO_LIMIT  # NaN and inf excluded
        yield new_scale, torch.where(fit, new_zero, z)

    return candidates


def row_codes(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of ``values`` (``(rows, n)``, for example a weight's per-group scales) as ``bits``-bit codes on
    the row's own linear grid (double quantization, QLoRA's and the K-quants' scales of scales): ``low`` the row's
    minimum and ``step = (max - low) / (2**bits - 1)``, both fp16-representable. Returns ``(codes uint8, low,
    step)`` (``low`` and ``step`` ``(rows,)`` float32); :func:`bitplan.kernels.dequant.expand_row_codes` decodes."""
    max_code = (1 << bits) - 1
    low = values.amin(dim=1).to(torch.float16).float()
    step = ((values.amax(dim=1) - low) / max_code).to(torch.float16).float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((values - low[:, None]) / safe[:, None]).round_().clamp_(0, max_code)
    return torch.where(step[:, None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8), low, step


def symmetric_grid_params(absmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and the fixed zero point ``2**(bits-1)`` of a grid symmetric around 0:
    ``scale = max|w| / (2**(bits-1) - 1)`` (fp16-representable), so ``-max..max`` are codes ``1..2**bits - 1``."""
    if bits < 2:
        raise ValueError("a symmetric grid needs at least 2 bits")
    half = 1 << (bits - 1)
    scale = (absmax / (half - 1)).clamp(min=1e-8).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    return scale, torch.full_like(scale, float(half))


def to_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as float (broadcasting ``scale`` and ``zero``)."""
    codes = values / scale
    if codes.shape != torch.broadcast_shapes(codes.shape, zero.shape):  # a zero wider than the values: not in place
        return (codes.round_() + zero).clamp_(0, (1 << bits) - 1)
    return codes.round_().add_(zero).clamp_(0, (1 << bits) - 1)  # in place: one new tensor, not four


def salience_calibrated_params(values: torch.Tensor, bits: int, salience: torch.Tensor,
                               clip_grid: tuple[float, ...] = CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """SliM-LLM's salience-weighted quantizer calibration for one column group of every row.

    Searches the shrink factor ``a`` of the range ``[a * min, a * max]`` per row that minimizes the
    salience-weighted squared error ``sum_j s_j (w_j - Q(w_j))^2`` over the group.

    Args:
        values: ``(rows, g)`` float32, one group of input columns.
        salience: ``(g,)`` or ``(rows, g)`` non-negative weights (for example the Hessian diagonal
            ``H_jj = sum_t x_tj^2``, the input energy each column's error is multiplied by).
    Returns:
        ``(scale, zero)``, each ``(rows, 1)``.
    """
    low = values.amin(dim=1, keepdim=True)
    high = values.amax(dim=1, keepdim=True)
    best_scale, best_zero = grid_params(low, high, bits)
    best_error = torch.full_like(best_scale, float("inf"))
    for shrink in clip_grid:
        scale, zero = grid_params(low * shrink, high * shrink, bits)
        error = ((to_codes(values, scale, zero, bits) - zero) * scale - values).pow(2)
        error = (error * salience).sum(dim=1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


SEARCH_CHUNK_ELEMENTS = 1 << 22  # rows searched at once: their float32 work copy stays under 16 MiB


def salience_calibrated_groups(weight: torch.Tensor, bits: int, group_size: int, salience: torch.Tensor,
                               clip_grid: tuple[float, ...] = CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`salience_calibrated_params` for every full group of ``group_size`` columns at once: the same
    arithmetic, element for element and in the same order, on a ``(rows, groups, group_size)`` view of as many
    rows as fit ``SEARCH_CHUNK_ELEMENTS``, instead of one call (some fifteen small tensor operations per shrink
    factor) per group. Same results, bit for bit (``tests/quantizer/test_grid.py`` compares them); 2.5-4.5x faster
    on SmolLM2's matrices, where the per-group calls spent their time dispatching operations on 32-column slices.

    Args:
        weight: ``(rows, columns)`` float32 with ``columns`` a multiple of ``group_size``.
        salience: ``(columns,)`` non-negative weights.
    Returns:
        ``(scale, zero)``, each ``(rows, columns // group_size)``.
    """
    rows, columns = weight.shape
    if columns % group_size or salience.shape != (columns,):
        raise ValueError(f"{columns} columns in groups of {group_size} with a ({columns},) salience, got "
                         f"{tuple(salience.shape)}")
    view = weight.reshape(rows, columns // group_size, group_size)

    def shrunk(chunk: slice) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        low = view[chunk].amin(dim=2, keepdim=True)
        high = view[chunk].amax(dim=2, keepdim=True)
        for shrink in clip_grid:
            yield grid_params(low * shrink, high * shrink, bits)

    return least_error_grids(view, salience.reshape(-1, group_size), bits, shrunk)


def least_error_grids(groups: torch.Tensor, weights: torch.Tensor, bits: int,
                      candidates: Callable[[slice], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                      fractional_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the candidate grids ``(scale, zero)`` of every group, the one that rounds the group with the least
    ``weights``-weighted squared error, the earliest kept on ties: the search behind the salience-calibrated
    integer grids (:func:`salience_calibrated_groups`) and the fractional-zero ones
    (:func:`bitplan.quantizer.rtn.offset_search`). Rows are searched in chunks of ``SEARCH_CHUNK_ELEMENTS`` on one
    work buffer, each candidate's error computed in place.

    Args:
        groups: ``(rows, n_groups, group_size)`` float32.
        weights: broadcastable to ``groups`` (``(n_groups, group_size)``), non-negative.
        candidates: given a chunk's row ``slice``, its candidate grids, each ``(scale, zero)`` of shape
            ``(chunk_rows, n_groups, 1)``.
        fractional_zero: codes are ``round(w / scale + zero)`` (:func:`offset_grid_params`) instead of
            ``round(w / scale) + zero`` (:func:`to_codes`).
    Returns:
        ``(scale, zero)``, each ``(rows, n_groups)``.
    """
    rows, n_groups, _ = groups.shape
    max_code = (1 << bits) - 1
    scales = torch.empty(rows, n_groups)
    zeros = torch.empty(rows, n_groups)
    step = max(1, SEARCH_CHUNK_ELEMENTS // max(groups[0].numel(), 1))
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        values = groups[chunk]
        work = torch.empty_like(values)
        best_scale = best_zero = best_error = None
        for scale, zero in candidates(chunk):
            # ((codes - zero) * scale - values) ** 2 * weights, in place
            torch.div(values, scale, out=work)
            if fractional_zero:
                work.add_(zero).round_()
            else:
                work.round_().add_(zero)
            work.clamp_(0, max_code).sub_(zero).mul_(scale).sub_(values).square_().mul_(weights)
            error = work.sum(dim=2, keepdim=True)
            if best_error is None:
                best_scale, best_zero, best_error = scale, zero, error
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        if best_scale is None:
            raise ValueError("no candidate grid to search")
        scales[chunk] = best_scale[..., 0]
        zeros[chunk] = best_zero[..., 0]
    return scales, zeros
