"""Importance-weighted searches for the scales (and minima) of GGML blocks, vectorized over every block at once.

A block of ``n`` weights ``x`` with importance ``w`` is stored as ``d * L[q]`` (a symmetric type: ``Q4_0``'s
``L = -8..7``, ``IQ4_NL``'s non-uniform table) or ``d * q + m`` (an affine type: ``Q4_1``, ``q = 0..nmax``). The
error we minimize is the one the allocation is told, ``E = sum_i w_i (x_i - xhat_i)^2``.

For each candidate scale (the block's signed largest weight mapped onto a level near either end of the grid) the
codes are rounded to the nearest level and the scale (and minimum) refit to those codes by weighted least squares,
``d = sum w x L / sum w L^2`` (a 2x2 system with a minimum); the candidate of least error is kept per block and
then alternately re-rounded and refit (Lloyd's iteration, which never raises ``E``). llama.cpp's
``make_qx_quants`` and ``make_qkx3_quants`` do the same per block in C with a different weight
(``w_i * sqrt(sigma^2 + x_i^2)``); here the candidates are tried for all blocks at once in torch.

Sums run in float64: the errors of neighbouring candidates differ by less than float32 resolves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

ScaleFit = tuple[torch.Tensor, torch.Tensor]  # (d (G,), idx (G, n) int64)
AffineFit = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (d (G,), m (G,), q (G, n) float32 codes)

# Relative positions of the candidate end level: the block's largest weight lands on ``end * factor``.
# Past 1 the peak is clipped: on a rotated SmolLM2 tensor, reaching 1.30 instead of 1.10 cut Q3_K's error by 6.5 %
# and Q4_0's by 7 %.
SCALE_FACTORS = tuple(0.70 + 0.025 * k for k in range(25))  # 0.70 .. 1.30
# Coarse grids (fewer than 64 levels) lose almost nothing with half the candidates (measured on Q4_0, IQ4_NL,
# Q3_K: error within 0.05 %), fine ones (Q8_0, Q6_K) lose 1 to 9 %, so they keep all.
COARSE_FACTORS = SCALE_FACTORS[::2]
# (low, high) trims of an affine block's range, as fractions of it: the grid spans [min + a R, max - b R].
RANGE_TRIMS = tuple((a, b) for a in (0.0, 0.04, 0.08, 0.14) for b in (0.0, 0.04, 0.08, 0.14))
LLOYD_ROUNDS = 3


@dataclass(frozen=True)
class Levels:
    """The values a code stands for, ascending: ``range(lo, hi + 1)`` for the uniform types, a table for IQ4."""

    values: tuple[float, ...]

    @property
    def uniform(self) -> bool:
        return all(b - a == 1 for a, b in zip(self.values, self.values[1:], strict=False))

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float32)

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the level nearest each value of ``t`` (int64, same shape; NaN-free input).

        A table of integers (IQ4's) has every midpoint on a multiple of 1/2, so each half-unit cell lies on one
        side of all of them: the cell's index looks the level up (a gather, several times faster than a search)."""
        if self.uniform:
            return (t - self.values[0]).round_().clamp_(0, len(self.values) - 1).long()
        lookup = _half_unit_lookup(self.values)
        cells = (t - (self.values[0] - 1)).mul_(2).floor_().clamp_(0, len(lookup) - 1).long()
        return lookup[cells]


@functools.lru_cache(maxsize=8)
def _half_unit_lookup(values: tuple[float, ...]) -> torch.Tensor:
    """The nearest level's index for each half-unit cell from ``values[0] - 1`` to ``values[-1] + 1``."""
    if any(v != int(v) for v in values):
        raise ValueError("a level table's values must be integers")
    table = torch.tensor(values, dtype=torch.float64)
    centres = values[0] - 1 + 0.25 + 0.5 * torch.arange(int(2 * (values[-1] - values[0] + 2)), dtype=torch.float64)
    return (centres[:, None] - table[None, :]).abs().argmin(dim=1)


def integer_levels(lo: int, hi: int) -> Levels:
    """The uniform levels ``lo .. hi``."""
    return Levels(tuple(float(v) for v in range(lo, hi + 1)))


def _sum(values: torch.Tensor) -> torch.Tensor:
    return values.sum(dim=-1, dtype=torch.float64)


def _safe(divisor: torch.Tensor) -> torch.Tensor:
    return torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def signed_peak(x: torch.Tensor) -> torch.Tensor:
    """Each row's weight of largest magnitude, with its sign: ``(G, n) -> (G, 1)``."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def refit_scale(x: torch.Tensor, w: torch.Tensor, coded: torch.Tensor, sxx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares scale of ``x ~ d * coded`` per row and its error ``sxx - sxl^2 / sll`` (float64)."""
    wl = w * coded
    sxl, sll = _sum(wl * x), _sum(wl * coded)
    d = sxl / _safe(sll)
    return d.float(), (sxx - d * sxl).clamp_(min=0)


def scale_error(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, coded: torch.Tensor) -> torch.Tensor:
    """``sum w (x - d * coded)^2`` per row, float64; ``d (G,)``."""
    return _sum(w * (x - d[:, None] * coded).square_())


def fit_scale(x: torch.Tensor, w: torch.Tensor, levels: Levels, *, factors: tuple[float, ...] | None = None,
              rounds: int = LLOYD_ROUNDS) -> ScaleFit:
    """The float scale ``d`` and codes of least weighted error per row of ``x (G, n)`` on ``levels``.

    Candidates map the row's signed peak onto each end level times each of ``factors``; each is rounded and
    refit, the best kept, then ``rounds`` Lloyd iterations (re-round, refit) where they lower the error."""
    if factors is None:
        factors = SCALE_FACTORS if len(levels.values) >= 64 else COARSE_FACTORS
    table = levels.tensor()
    peak = signed_peak(x)
    sxx = _sum(w * x * x)
    best_err = torch.full_like(sxx, float("inf"))
    best_d = torch.zeros(x.shape[0])
    best_idx = torch.zeros(x.shape, dtype=torch.int64)
    ends = [e for e in (levels.values[0], levels.values[-1]) if e != 0]
    for end in ends:
        for factor in factors:
            idx = levels.nearest(x / _safe(peak / (end * factor)))
            d, err = refit_scale(x, w, table[idx], sxx)
            better = err < best_err
            best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
            best_idx = torch.where(better[:, None], idx, best_idx)
    for _ in range(rounds):
        idx = levels.nearest(x / _safe(best_d)[:, None])
        d, err = refit_scale(x, w, table[idx], sxx)
        better = err < best_err
        best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
        best_idx = torch.where(better[:, None], idx, best_idx)
    return best_d, best_idx


def refit_affine(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, nonpositive_min: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares ``(d, m)`` of ``x ~ d * q + m`` per row (``d >= 0``; ``m <= 0`` if ``nonpositive_min``)
    and its weighted error (float64)."""
    wq = w * q
    sw, sq, sqq = _sum(w), _sum(wq), _sum(wq * q)
    sx, sxq, sxx = _sum(w * x), _sum(wq * x), _sum(w * x * x)
    det = sw * sqq - sq * sq
    flat = det <= 1e-12 * _safe(sw * sqq)
    d = torch.where(flat, torch.zeros_like(det), (sw * sxq - sq * sx) / _safe(det))
    m = torch.where(flat, sx / _safe(sw), (sqq * sx - sq * sxq) / _safe(det))
    negative = d < 0
    d, m = torch.where(negative, torch.zeros_like(d), d), torch.where(negative, sx / _safe(sw), m)
    if nonpositive_min:
        positive = m > 0
        d = torch.where(positive, (sxq / _safe(sqq)).clamp(min=0), d)
        m = torch.where(positive, torch.zeros_like(m), m)
    err = sxx - 2 * d * sxq - 2 * m * sx + d * d * sqq + 2 * d * m * sq + m * m * sw
    return d.float(), m.float(), err.clamp_(min=0)


def affine_codes(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, nmax: int) -> torch.Tensor:
    """Codes ``round((x - m) / d)`` in ``0..nmax`` (float32) for ``d, m`` of shape ``(G,)``."""
    return ((x - m[:, None]) / _safe(d)[:, None]).round_().clamp_(0, nmax)


def affine_error(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum w (x - d q - m)^2`` per row, float64."""
    return _sum(w * (x - d[:, None] * q - m[:, None]).square_())


def fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, *, nonpositive_min: bool,
               trims: tuple[tuple[float, float], ...] = RANGE_TRIMS, rounds: int = LLOYD_ROUNDS) -> AffineFit:
    """The float ``(d, m)`` and codes ``0..nmax`` of least weighted error per row of ``x (G, n)``, ``x ~ d q + m``.

    Candidates are the row's ``[min, max]`` trimmed at either end by each of ``trims`` (with ``min`` raised to 0
    first where ``nonpositive_min``: a K-quant's minimum is ``-dmin * code``) and the grid from ``min`` with its
    step stretched by up to 0.8 of a code over the range, each rounded and refit by least squares; the best is
    kept, then ``rounds`` Lloyd iterations where they lower the error."""
    low, high = x.min(dim=-1).values, x.max(dim=-1).values
    if nonpositive_min:
        low = low.clamp(max=0)
    span = high - low
    best_err = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    best_d, best_m = torch.zeros(x.shape[0]), torch.zeros(x.shape[0])
    best_q = torch.zeros_like(x)
    candidates = [(low + a * span, (high - low - (a + b) * span) / nmax) for a, b in trims]
    # and llama.cpp's family (make_qkx3_quants): the minimum kept, the step stretched (Q5_1's error -8 %)
    candidates += [(low, span / (nmax + 0.2 * k)) for k in range(-4, 5)]
    for _ in range(rounds + 1):
        for start, step in candidates:
            q = affine_codes(x, step, start, nmax)
            d, m, err = refit_affine(x, w, q, nonpositive_min)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
            best_q = torch.where(better[:, None], q, best_q)
        candidates = [(best_m, best_d)]
    return best_d, best_m, best_q
