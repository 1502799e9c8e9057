"""Two-level searches for the K-quant and IQ4_XS super-blocks: 256 weights in sub-blocks of 16 or 32, each
sub-block's scale (and minimum) stored as a small integer code times the super-block's fp16 ``d`` (and ``dmin``).

Each sub-block's float scale is first found by :mod:`.search` alone. Storing it as ``d * code`` is itself a
one-dimensional weighted fit: with a sub-block's codes held, its error grows as ``(s - s*)^2 * sum w L^2`` when its
scale ``s`` moves off the least-squares ``s*``, so the super-block's ``d`` and the codes are found by
:func:`.search.fit_scale` over the sub-scales, each weighted by ``sum w L^2`` (its minimum by ``sum w``). The
weights are then re-rounded under the stored scales and the exact error of the super-block measured; the
sub-scales are refit to those codes and the whole repeated (``SUPER_ROUNDS``), keeping per super-block the round
of least exact error. llama.cpp quantizes its sub-scales by rounding against the largest (``make_qp_quants`` for
Q2_K's weighted case), once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.quantizer.ggml_encode.search import (
    SCALE_FACTORS,
    Levels,
    affine_codes,
    affine_error,
    fit_affine,
    fit_scale,
    refit_affine,
    refit_scale,
    scale_error,
)

SUPER = 256
SUPER_ROUNDS = 3


@dataclass(frozen=True)
class SuperLayout:
    """How a super-block type stores its weights: ``sub`` weights per sub-block; ``codes``, the levels of a
    symmetric type's weights (``None`` for an affine one, whose codes are ``0..nmax``); ``scales``, the levels
    of the sub-scale codes; ``mins``, those of an affine type's minimum codes."""

    sub: int
    scales: Levels
    codes: Levels | None = None
    nmax: int = 0
    mins: Levels | None = None


@dataclass(frozen=True)
class SymmetricSuper:
    """A symmetric super-block encoding: ``d (S,)`` fp16-exact, sub-scale codes ``scale_codes (S, nsub)`` (the
    level values, not indices), weight code indices ``idx (S, 256)`` and the exact error ``error (S,)``."""

    d: torch.Tensor
    scale_codes: torch.Tensor
    idx: torch.Tensor
    error: torch.Tensor


@dataclass(frozen=True)
class AffineSuper:
    """An affine super-block encoding: ``d``, ``dmin (S,)`` fp16-exact; ``scale_codes``, ``min_codes (S, nsub)``;
    codes ``q (S, 256)`` in ``0..nmax``; the exact error ``error (S,)``. A weight decodes as
    ``d * scale_code * q - dmin * min_code``."""

    d: torch.Tensor
    dmin: torch.Tensor
    scale_codes: torch.Tensor
    min_codes: torch.Tensor
    q: torch.Tensor
    error: torch.Tensor


def fp16(values: torch.Tensor) -> torch.Tensor:
    """``values`` as the nearest fp16, back in float32 (what a block's header stores)."""
    return values.to(torch.float16).float()


def store_scales(subscales: torch.Tensor, weights: torch.Tensor, levels: Levels
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-scales ``(S, nsub)`` -> the super-block's fp16 ``d (S,)`` and the code values ``(S, nsub)`` whose
    ``d * code`` is nearest each, ``d`` chosen by the fit of least ``weights``-weighted error."""
    d, _ = fit_scale(subscales, weights, levels, factors=SCALE_FACTORS)  # a few values a block: try them all
    d = fp16(d)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return d, levels.tensor()[levels.nearest(subscales / safe[:, None])]


def encode_symmetric_super(x: torch.Tensor, w: torch.Tensor, layout: SuperLayout) -> SymmetricSuper:
    """``x, w (S, 256)`` -> the symmetric super-block encoding of least exact weighted error found."""
    assert layout.codes is not None  # the layouts are module constants
    count, nsub = x.shape[0], SUPER // layout.sub
    xs, ws = x.reshape(-1, layout.sub), w.reshape(-1, layout.sub)
    table = layout.codes.tensor()
    sub_d, idx = fit_scale(xs, ws, layout.codes)
    sxx = (ws * xs * xs).sum(-1, dtype=torch.float64)
    best: SymmetricSuper | None = None
    for _ in range(SUPER_ROUNDS):
        curvature = (ws * table[idx].square()).sum(-1).reshape(count, nsub)
        d, codes = store_scales(sub_d.reshape(count, nsub), curvature, layout.scales)
        codes, idx, error = _nudge_symmetric(xs, ws, layout, d, codes)
        best = _keep(best, SymmetricSuper(d, codes, idx.reshape(count, SUPER), error.sum(-1)))
        sub_d, _ = refit_scale(xs, ws, table[idx], sxx)
    assert best is not None
    return best


def encode_affine_super(x: torch.Tensor, w: torch.Tensor, layout: SuperLayout) -> AffineSuper:
    """``x, w (S, 256)`` -> the affine super-block encoding (minimum ``<= 0``) of least exact weighted error."""
    assert layout.mins is not None
    count, nsub = x.shape[0], SUPER // layout.sub
    xs, ws = x.reshape(-1, layout.sub), w.reshape(-1, layout.sub)
    sub_d, sub_m, q = fit_affine(xs, ws, layout.nmax, nonpositive_min=True)
    mass = ws.sum(-1).reshape(count, nsub)
    best: AffineSuper | None = None
    for _ in range(SUPER_ROUNDS):
        curvature = (ws * q.square()).sum(-1).reshape(count, nsub)
        d, scale_codes = store_scales(sub_d.reshape(count, nsub), curvature, layout.scales)
        dmin, min_codes = store_scales(-sub_m.reshape(count, nsub), mass, layout.mins)
        scale_codes, min_codes, q, error = _nudge_affine(xs, ws, layout, (d, dmin), (scale_codes, min_codes))
        best = _keep(best, AffineSuper(d, dmin, scale_codes, min_codes, q.reshape(count, SUPER), error.sum(-1)))
        sub_d, sub_m, _ = refit_affine(xs, ws, q, True)
    assert best is not None
    return best


def _round_symmetric(xs: torch.Tensor, ws: torch.Tensor, levels: Levels, scale: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sub-block's weights rounded under its stored ``scale (G,)``: level indices and exact errors."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    idx = levels.nearest(xs / safe[:, None])
    return idx, scale_error(xs, ws, scale, levels.tensor()[idx])


def _nudge_symmetric(xs: torch.Tensor, ws: torch.Tensor, layout: SuperLayout, d: torch.Tensor,
                     codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sub-scale code moved by -1, 0 or +1 where that lowers its sub-block's exact error with its weights
    re-rounded (the quadratic model behind :func:`store_scales` ignores that the codes move with the scale).
    Returns the codes ``(S, nsub)``, the level indices ``(S * nsub, sub)`` and the errors ``(S, nsub)``."""
    assert layout.codes is not None
    low, high = layout.scales.values[0], layout.scales.values[-1]
    best_codes, best_idx, best_err = codes, None, None
    for step in (0.0, -1.0, 1.0):
        moved = (codes + step).clamp(low, high)
        idx, err = _round_symmetric(xs, ws, layout.codes, (d[:, None] * moved).reshape(-1))
        err = err.reshape(codes.shape)
        if best_err is None or best_idx is None:
            best_idx, best_err = idx, err
            continue
        better = err < best_err
        best_codes, best_err = torch.where(better, moved, best_codes), torch.where(better, err, best_err)
        best_idx = torch.where(better.reshape(-1, 1), idx, best_idx)
    assert best_idx is not None and best_err is not None
    return best_codes, best_idx, best_err


def _nudge_affine(xs: torch.Tensor, ws: torch.Tensor, layout: SuperLayout, heads: tuple[torch.Tensor, torch.Tensor],
                  codes: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_nudge_symmetric` for an affine type: each scale code moved by -1, 0 or +1, then each minimum
    code by -1 or +1, where the sub-block's exact error with re-rounded codes drops. ``heads``: ``(d, dmin)``
    ``(S,)``; ``codes``: ``(scale_codes, min_codes)`` ``(S, nsub)``. Returns those codes, the weights' codes
    ``(S * nsub, sub)`` and the errors ``(S, nsub)``."""
    assert layout.mins is not None
    d, dmin = heads
    scale_codes, min_codes = codes
    best_q, best_err = None, None
    moves = [(step, 0.0) for step in (0.0, -1.0, 1.0)] + [(0.0, step) for step in (-1.0, 1.0)]
    for scale_step, min_step in moves:
        new_scale = (scale_codes + scale_step).clamp(layout.scales.values[0], layout.scales.values[-1])
        new_min = (min_codes + min_step).clamp(layout.mins.values[0], layout.mins.values[-1])
        scale, offset = (d[:, None] * new_scale).reshape(-1), -(dmin[:, None] * new_min).reshape(-1)
        q = affine_codes(xs, scale, offset, layout.nmax)
        err = affine_error(xs, ws, scale, offset, q).reshape(scale_codes.shape)
        if best_q is None or best_err is None:
            best_q, best_err = q, err
            continue
        better = err < best_err
        scale_codes, min_codes = torch.where(better, new_scale, scale_codes), torch.where(better, new_min, min_codes)
        best_err, best_q = torch.where(better, err, best_err), torch.where(better.reshape(-1, 1), q, best_q)
    assert best_q is not None and best_err is not None
    return scale_codes, min_codes, best_q, best_err


def _keep(best, candidate):  # type: ignore[no-untyped-def]
    """Per super-block, the fields of whichever of ``best`` and ``candidate`` has the lower error."""
    if best is None:
        return candidate
    better = candidate.error < best.error
    fields = {}
    for name in best.__dataclass_fields__:
        old, new = getattr(best, name), getattr(candidate, name)
        mask = better.reshape(-1, *([1] * (old.dim() - 1)))
        fields[name] = torch.where(mask, new, old)
    return type(best)(**fields)
