"""Our encoder of each GGML type: blocks of a weight -> :mod:`.search` / :mod:`.superblock` -> :mod:`.pack`'s
bytes. :data:`TYPE_ENCODERS` maps a ``GGMLQuantizationType`` to ``(blocks, weights) -> (B, type_bytes) uint8``,
where ``blocks`` and ``weights`` are ``(B, block)`` float32 (the weight's rows cut into the type's blocks and
each weight's importance)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from bitplan.quantizer.ggml_encode import pack
from bitplan.quantizer.ggml_encode.search import (
    Levels,
    affine_codes,
    affine_error,
    fit_affine,
    fit_scale,
    integer_levels,
    refit_affine,
    refit_scale,
    scale_error,
)
from bitplan.quantizer.ggml_encode.superblock import (
    SuperLayout,
    encode_affine_super,
    encode_symmetric_super,
    fp16,
)

BlockEncoder = Callable[[torch.Tensor, torch.Tensor], np.ndarray]

IQ4_VALUES = Levels((-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0, 53.0, 69.0,
                     89.0, 113.0))  # kvalues_iq4nl
FP16_ROUNDS = 2  # re-round and refit under the fp16 header, kept where the exact error drops


def _np(values: torch.Tensor) -> np.ndarray:
    return values.numpy()


def _symmetric_fp16(x: torch.Tensor, w: torch.Tensor, levels: Levels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the fp16 ``d`` and level indices of least exact error, ``x ~ d * levels[idx]``."""
    table = levels.tensor()
    d, idx = fit_scale(x, w, levels)
    sxx = (w * x * x).sum(-1, dtype=torch.float64)
    best_err = torch.full_like(sxx, float("inf"))
    best_d, best_idx = d, idx
    for _ in range(FP16_ROUNDS):
        d = fp16(d)
        idx = levels.nearest(x / torch.where(d == 0, torch.ones_like(d), d)[:, None])
        err = scale_error(x, w, d, table[idx])
        better = err < best_err
        best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
        best_idx = torch.where(better[:, None], idx, best_idx)
        d, _ = refit_scale(x, w, table[idx], sxx)
    return best_d, best_idx


def _affine_fp16(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block: fp16 ``d``, ``m`` and codes ``0..nmax`` of least exact error, ``x ~ d * q + m``."""
    d, m, q = fit_affine(x, w, nmax, nonpositive_min=False)
    best_err = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    best = (d, m, q)
    for _ in range(FP16_ROUNDS):
        d, m = fp16(d), fp16(m)
        q = affine_codes(x, d, m, nmax)
        err = affine_error(x, w, d, m, q)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, d, best[0]), torch.where(better, m, best[1]),
                torch.where(better[:, None], q, best[2]))
        d, m, _ = refit_affine(x, w, q, False)
    return best


def _q4_0(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    d, idx = _symmetric_fp16(x, w, integer_levels(-8, 7))
    return pack.pack_q4_0(_np(d), _np(idx).astype(np.uint8))


def _q5_0(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    d, idx = _symmetric_fp16(x, w, integer_levels(-16, 15))
    return pack.pack_q5_0(_np(d), _np(idx).astype(np.uint8))


def _q8_0(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    d, idx = _symmetric_fp16(x, w, integer_levels(-128, 127))
    return pack.pack_q8_0(_np(d), (_np(idx) - 128).astype(np.int8))


def _iq4_nl(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    d, idx = _symmetric_fp16(x, w, IQ4_VALUES)
    return pack.pack_iq4_nl(_np(d), _np(idx).astype(np.uint8))


def _q4_1(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    d, m, q = _affine_fp16(x, w, 15)
    return pack.pack_q4_1(_np(d), _np(m), _np(q).astype(np.uint8))


def _q5_1(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    d, m, q = _affine_fp16(x, w, 31)
    return pack.pack_q5_1(_np(d), _np(m), _np(q).astype(np.uint8))


Q2_K = SuperLayout(sub=16, nmax=3, scales=integer_levels(0, 15), mins=integer_levels(0, 15))
Q3_K = SuperLayout(sub=16, codes=integer_levels(-4, 3), scales=integer_levels(-32, 31))
Q4_K = SuperLayout(sub=32, nmax=15, scales=integer_levels(0, 63), mins=integer_levels(0, 63))
Q5_K = SuperLayout(sub=32, nmax=31, scales=integer_levels(0, 63), mins=integer_levels(0, 63))
Q6_K = SuperLayout(sub=16, codes=integer_levels(-32, 31), scales=integer_levels(-128, 127))
IQ4_XS = SuperLayout(sub=32, codes=IQ4_VALUES, scales=integer_levels(-32, 31))


def _affine_k(layout: SuperLayout, packer: Callable[..., np.ndarray]) -> BlockEncoder:
    def encode(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
        found = encode_affine_super(x, w, layout)
        return packer(_np(found.d), _np(found.dmin), _np(found.scale_codes).astype(np.uint8),
                      _np(found.min_codes).astype(np.uint8), _np(found.q).astype(np.uint8))

    return encode


def _symmetric_k(layout: SuperLayout, packer: Callable[..., np.ndarray], scale_offset: int,
                 code_offset: int) -> BlockEncoder:
    """``scale_offset``: added to a sub-scale code as stored (Q3_K and IQ4_XS store ``scale + 32``);
    ``code_offset``: added to a level index to give the stored code (``Q3_K``: indices 0..7 are ``q + 4``
    already, 0; a table type stores the index)."""
    def encode(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
        found = encode_symmetric_super(x, w, layout)
        scales = _np(found.scale_codes).astype(np.int16) + scale_offset
        return packer(_np(found.d), scales, (_np(found.idx) + code_offset).astype(np.uint8))

    return encode


TYPE_ENCODERS: dict[T, BlockEncoder] = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0, T.IQ4_NL: _iq4_nl,
    T.Q2_K: _affine_k(Q2_K, pack.pack_q2_k),
    T.Q3_K: _symmetric_k(Q3_K, pack.pack_q3_k, 32, 0),
    T.Q4_K: _affine_k(Q4_K, pack.pack_q4_k),
    T.Q5_K: _affine_k(Q5_K, pack.pack_q5_k),
    T.Q6_K: _symmetric_k(Q6_K, lambda d, s, c: pack.pack_q6_k(d, s.astype(np.int8), c), 0, 0),
    T.IQ4_XS: _symmetric_k(IQ4_XS, pack.pack_iq4_xs, 32, 0),
}
