"""The asymmetric integer grid of one group and SliM-LLM's salience-weighted search for its range."""

from __future__ import annotations

import torch

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
    return (torch.round(values / scale) + zero).clamp(0, (1 << bits) - 1)


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
