"""Triton kernels for the ``bitstream-int32`` format: unpack + dequantize, and a fused dequantize-matmul.

Each kernel has its pure-torch reference in this module (``reference_*``); the tests compare the two in
``TRITON_INTERPRET=1`` mode on the CPU (exactly for codes, within float tolerance for products). On a CUDA GPU
``QuantLinear`` calls the fused kernel; elsewhere it calls the reference.

Element ``(n, k)`` of an ``(N, K)`` code matrix is value ``i = n * K + k`` of the bit stream: bits
``[i * b, (i + 1) * b)``, so its word is ``i * b >> 5`` at shift ``i * b & 31``, continued in the next word when
``shift + b > 32`` (3-, 5- and 6-bit codes straddle words). The kernels read the two words as one 64-bit value.
"""

from __future__ import annotations

import os

import torch

from bitplan.kernels.bitpack import unpack_bitstream_int32
from bitplan.kernels.dequant import dequantize_groupwise

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional extra
    triton = None


def triton_available() -> bool:
    """Whether the kernels can run here: triton installed, and a CUDA device or the interpreter."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def reference_dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, rows: int,
                         cols: int, group_size: int) -> torch.Tensor:
    """``(rows, cols)`` float32 weight from packed codes and group scales/zeros (pure torch)."""
    codes = unpack_bitstream_int32(words.cpu(), bits=bits, count=rows * cols).reshape(rows, cols)
    return dequantize_groupwise(codes.to(words.device), scales, zeros, group_size=group_size)


def reference_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int,
                     rows: int, cols: int, group_size: int) -> torch.Tensor:
    """``x (M, cols) @ W^T -> (M, rows)`` with ``W`` dequantized by :func:`reference_dequantize` (float32)."""
    weight = reference_dequantize(words, scales, zeros, bits=bits, rows=rows, cols=cols, group_size=group_size)
    return x.float() @ weight.T


if triton is not None:

    @triton.jit
    def _codes(words_ptr, index, valid, BITS: tl.constexpr):
        """Codes of stream elements ``index`` (int64), 0 where not ``valid``."""
        bit = index * BITS
        word = bit >> 5
        shift = bit & 31
        low = tl.load(words_ptr + word, mask=valid, other=0).to(tl.int64) & 0xFFFFFFFF
        straddles = valid & ((shift + BITS) > 32)
        high = tl.load(words_ptr + word + 1, mask=straddles, other=0).to(tl.int64) & 0xFFFFFFFF
        return ((low | (high << 32)) >> shift) & ((1 << BITS) - 1)

    @triton.jit
    def _dequantized_tile(words_ptr, scales_ptr, zeros_ptr, n, k, N, K, group_size, n_groups, BITS: tl.constexpr):
        valid = (n[:, None] < N) & (k[None, :] < K)
        index = n[:, None].to(tl.int64) * K + k[None, :]
        codes = _codes(words_ptr, index, valid, BITS).to(tl.float32)
        group = n[:, None] * n_groups + k[None, :] // group_size
        scale = tl.load(scales_ptr + group, mask=valid, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group, mask=valid, other=0.0).to(tl.float32)
        return (codes - zero) * scale

    @triton.jit
    def _dequantize_kernel(words_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, group_size, n_groups,
                           BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        weight = _dequantized_tile(words_ptr, scales_ptr, zeros_ptr, n, k, N, K, group_size, n_groups, BITS)
        tl.store(out_ptr + n[:, None] * K + k[None, :], weight, mask=(n[:, None] < N) & (k[None, :] < K))

    @triton.jit
    def _matmul_kernel(x_ptr, words_ptr, scales_ptr, zeros_ptr, y_ptr, M, N, K, group_size, n_groups, stride_xm,
                       stride_ym, BITS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K),
                        other=0.0)
            weight = _dequantized_tile(words_ptr, scales_ptr, zeros_ptr, n, k, N, K, group_size, n_groups, BITS)
            acc += tl.dot(x, tl.trans(weight.to(x.dtype)))
        mask = (m[:, None] < M) & (n[None, :] < N)
        out = y_ptr + m[:, None] * stride_ym + n[None, :]
        if ACCUMULATE:
            acc += tl.load(out, mask=mask, other=0.0)
        tl.store(out, acc, mask=mask)


def _check_triton() -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: pip install 'bitplan[kernels]'")


def triton_dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, rows: int,
                      cols: int, group_size: int, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """Triton version of :func:`reference_dequantize`."""
    _check_triton()
    out = torch.empty(rows, cols, dtype=torch.float32, device=words.device)
    grid = (triton.cdiv(rows, block_n), triton.cdiv(cols, block_k))
    _dequantize_kernel[grid](words, scales.contiguous(), zeros.contiguous(), out, rows, cols, group_size,
                             scales.shape[1], BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def triton_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int,
                  rows: int, cols: int, group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of :func:`reference_matmul` (float32 result); with ``out``, adds into it instead
    (the segments of a mixed-width matrix accumulate into one output)."""
    _check_triton()
    x = x.contiguous()
    batch = x.shape[0]
    accumulate = out is not None
    if out is None:
        out = torch.empty(batch, rows, dtype=torch.float32, device=x.device)
    block_m = 16 if batch <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(batch, block_m), triton.cdiv(rows, block_n))
    _matmul_kernel[grid](x, words, scales.contiguous(), zeros.contiguous(), out, batch, rows, cols, group_size,
                         scales.shape[1], x.stride(0), out.stride(0), BITS=bits, ACCUMULATE=accumulate,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
