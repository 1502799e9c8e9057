"""Encoders of llama.cpp's GGML types that a job chooses by name (``--encoder``): a registry of
:class:`Encoder` entries, each ``(weight (rows, columns), qtype, importance (columns,) | None) -> (rows, row_bytes)
uint8`` blocks that llama.cpp and the ``gguf`` package decode.

* ``llama.cpp``: llama.cpp's own ``ggml_quantize_chunk`` (:func:`bitplan.quantizer.ggml.quantize_ggml`), the
  reference and the peer.
* ``bitplan``: ours (:mod:`.types`): an importance-weighted search of every block's scale (and minimum; for the
  K-quants and IQ4_XS the super-block's scale of the sub-scales too), vectorized over all blocks, minimizing
  exactly the error the allocation is told, ``sum_j importance_j (w_j - decoded_j)^2``. Same bytes per row.

Adding one is an entry in :data:`ENCODERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from bitplan.quantizer.ggml import quantize_ggml, source_blocks_for

EncodeFn = Callable[[torch.Tensor, GGMLQuantizationType, "torch.Tensor | None"], np.ndarray]

# Weights encoded at once: the searches make a dozen float32 passes per candidate over a chunk, twice as fast
# when it stays in cache (2**16 against 2**21 on a 2-core machine; 2**14 is slower again, Python's overhead).
CHUNK_WEIGHTS = 1 << 16
BITPLAN_VERSION = 1  # of our encoder's choices: part of the sensitivity cache key (a change re-measures errors)


@dataclass(frozen=True)
class Encoder:
    """A registered GGML encoder: its job name, what it is (for ``--help`` and the manifest) and the function."""

    name: str
    description: str
    encode: EncodeFn
    version: str


def bitplan_types() -> tuple[GGMLQuantizationType, ...]:
    """The GGML types our own encoder writes (the others stay llama.cpp's)."""
    from bitplan.quantizer.ggml_encode.types import TYPE_ENCODERS

    return tuple(TYPE_ENCODERS)


def encode_bitplan(weight: torch.Tensor, qtype: GGMLQuantizationType,
                   importance: torch.Tensor | None = None) -> np.ndarray:
    """``weight (rows, columns)`` -> ``(rows, row_bytes)`` uint8 blocks of ``qtype`` by our search.

    ``importance (columns,)``: each column's weight in the error (the calibration's input energy); ``None``
    weighs every column alike. A column of zero importance still gets a tiny weight, so that a block whose
    columns all have none is rounded by plain least squares rather than arbitrarily.

    Runs torch on one thread: its ops on a cache-sized chunk split across threads wait on each other, and on a
    machine whose cores are busy a SmolLM2 tensor took 90 s in Q3_K on 2 threads against 1.2 s on one."""
    from bitplan.quantizer.ggml_encode.types import TYPE_ENCODERS

    if qtype not in TYPE_ENCODERS:
        raise ValueError(f"the bitplan encoder does not write {qtype.name}; it writes "
                         f"{', '.join(t.name for t in TYPE_ENCODERS)} (use --encoder llama.cpp for the others)")
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    rows, columns = weight.shape
    if columns % block:
        raise ValueError(f"{qtype.name} needs rows divisible by {block}, got {columns} columns")
    source = weight.detach().to(torch.float32).cpu()
    column_weight = torch.ones(columns) if importance is None else importance.detach().to(torch.float32).cpu()
    if column_weight.shape != (columns,) or not bool(torch.isfinite(column_weight).all()) \
            or bool((column_weight < 0).any()):
        raise ValueError(f"importance must be ({columns},) finite and non-negative, got {tuple(column_weight.shape)}")
    column_weight = column_weight + 1e-9 * float(column_weight.mean().clamp(min=1e-30))
    out = np.empty((rows, columns // block * type_bytes), dtype=np.uint8)
    step = max(1, CHUNK_WEIGHTS // columns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see below
    try:
        with torch.no_grad():
            for start in range(0, rows, step):
                chunk = source[start:start + step]
                x = chunk.reshape(-1, block)
                w = column_weight.expand_as(chunk).reshape(-1, block)
                out[start:start + step] = TYPE_ENCODERS[qtype](x, w).reshape(chunk.shape[0], -1)
    finally:
        torch.set_num_threads(threads)
    return out


def _bitplan_or_llama_cpp(weight: torch.Tensor, qtype: GGMLQuantizationType,
                          importance: torch.Tensor | None) -> np.ndarray:
    """Ours where we write the type, llama.cpp's elsewhere (the IQ2/IQ3 types), so a job may name any type."""
    if qtype not in bitplan_types():
        return quantize_ggml(weight, qtype, importance)
    known = source_blocks_for(np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy()), qtype)
    return known if known is not None else encode_bitplan(weight, qtype, importance)


def encode_ggml(weight: torch.Tensor, qtype: GGMLQuantizationType, importance: torch.Tensor | None = None, *,
                encoder: str = "llama.cpp") -> np.ndarray:
    """``weight (rows, columns)`` -> ``(rows, row_bytes)`` uint8 blocks of ``qtype`` by the registered ``encoder``.
    Either returns a remembered source's own blocks where they decode to exactly ``weight``
    (:func:`bitplan.quantizer.ggml.remember_source_blocks`)."""
    return check_encoder(encoder).encode(weight, qtype, importance)


ENCODERS: dict[str, Encoder] = {
    "llama.cpp": Encoder("llama.cpp", "llama.cpp's ggml_quantize_chunk with the importance vector", quantize_ggml,
                         version="ggml_quantize_chunk"),
    "bitplan": Encoder("bitplan", "bitplan's importance-weighted search of each block's scales and minima "
                       "(llama.cpp's for the IQ2/IQ3 types)", _bitplan_or_llama_cpp,
                       version=f"bitplan-{BITPLAN_VERSION}"),
}
DEFAULT_ENCODER = "llama.cpp"


def check_encoder(name: str) -> Encoder:
    """The registered encoder ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in ENCODERS:
        raise ValueError(f"unknown GGML encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]
