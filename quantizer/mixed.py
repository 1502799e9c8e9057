"""Mixed widths inside one layer (SliM-LLM's group-wise mixed precision): choosing each column group's width,
quantizing with per-group widths, and splitting the result into the kernel's width segments."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bitplan.allocator import AllocationProblem, Budget, Option, Unit, solve_allocation
from bitplan.kernels.bitpack import pack_bitstream_int32
from bitplan.kernels.quant_linear import segment_layout
from bitplan.quantizer.rtn import QuantizedWeight, quantization_error, quantize_rtn
from bitplan.quantizer.sizes import SCALE_BYTES, ZERO_BYTES

WORD_BITS = 32


def can_mix(in_features: int, group_size: int) -> bool:
    """Mixed widths keep the size exact only when every segment fills whole 32-bit words per row."""
    return group_size % WORD_BITS == 0 and in_features % WORD_BITS == 0


def neighbour_widths(bits: int) -> tuple[int, ...]:
    """The widths a group of a ``bits``-bit layer may take: ``bits - 1``, ``bits``, ``bits + 1`` within 2..8."""
    return tuple(b for b in (bits - 1, bits, bits + 1) if 2 <= b <= 8)


def group_distortion(weight: torch.Tensor, input_energy: torch.Tensor, widths: Sequence[int],
                     group_size: int) -> np.ndarray:
    """``(n_groups, len(widths))``: each column group's output error at each width under the diagonal
    approximation, ``sum_j H_jj sum_r dW_rj^2`` (``input_energy = diag(H)``)."""
    n_groups = -(-weight.shape[1] // group_size)
    result = np.zeros((n_groups, len(widths)))
    for i, bits in enumerate(widths):
        column_error = quantization_error(weight, bits=bits, group_size=group_size).pow(2).sum(dim=0)
        weighted = torch.nn.functional.pad(column_error * input_energy.float(), (0, n_groups * group_size
                                                                                  - weight.shape[1]))
        result[:, i] = weighted.reshape(n_groups, group_size).sum(dim=1).double().numpy()
    return result


def choose_group_bits(weight: torch.Tensor, input_energy: torch.Tensor, *, bits: int, group_size: int
                      ) -> tuple[int, ...]:
    """Each column group's width, keeping the layer's size at ``bits``: the exact knapsack over the groups'
    ``bits - 1, bits, bits + 1`` options (it contains SliM-LLM's salience search, so it is never worse;
    ``allocator.slim`` tests that)."""
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group_size)
    widths = neighbour_widths(bits)
    if not can_mix(in_features, group_size) or len(widths) < 2:
        return (bits,) * n_groups
    distortion = group_distortion(weight, input_energy, widths, group_size)
    overhead = out_features * (SCALE_BYTES + ZERO_BYTES)
    units = tuple(
        Unit(name=f"group{g}", options=tuple(
            Option(bits=b, bytes=out_features * min(group_size, in_features - g * group_size) * b / 8 + overhead,
                   distortion=float(distortion[g, i])) for i, b in enumerate(widths)))
        for g in range(n_groups))
    budget = sum(unit.options[widths.index(bits)].bytes for unit in units)
    allocation = solve_allocation(AllocationProblem(units=units, budget=Budget(bytes=budget)), solver="highs")
    return tuple(units[g].options[k].bits for g, k in enumerate(allocation.choice))


def quantize_rtn_mixed(weight: torch.Tensor, group_bits: Sequence[int], *, group_size: int,
                       salience: torch.Tensor | None = None, symmetric: bool = False) -> QuantizedWeight:
    """RTN with one width per column group (each group's grid is the one plain RTN gives it at its width)."""
    codes = torch.zeros(weight.shape, dtype=torch.uint8)
    n_groups = len(group_bits)
    scales = torch.zeros(weight.shape[0], n_groups, dtype=torch.float16)
    zeros = torch.zeros_like(scales)
    for bits in sorted(set(group_bits)):
        q = quantize_rtn(weight, bits=bits, group_size=group_size, salience=salience, symmetric=symmetric)
        for g in (g for g, b in enumerate(group_bits) if b == bits):
            columns = slice(g * group_size, (g + 1) * group_size)
            codes[:, columns] = q.codes[:, columns]
            scales[:, g], zeros[:, g] = q.scales[:, g], q.zeros[:, g]
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=max(group_bits), group_size=group_size,
                           group_bits=tuple(group_bits))


def pack_segments(quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The ``QuantLinear`` buffers of a weight: ``qweight``, ``scales``, ``zeros`` for one width, else
    ``qweight_b{b}``, ``scales_b{b}``, ``zeros_b{b}`` per width segment; with double-quantized scales
    (``scale_bits``) ``scales_q``, ``zeros_q`` and ``scale_range`` instead of ``scales`` and ``zeros``."""
    if quantized.scale_bits is not None:
        return {"qweight": pack_bitstream_int32(quantized.codes, bits=quantized.bits),
                "scales_q": pack_bitstream_int32(quantized.scale_codes, bits=quantized.scale_bits),
                "zeros_q": pack_bitstream_int32(quantized.zero_codes, bits=quantized.scale_bits),
                "scale_range": quantized.scale_range}
    if quantized.group_bits is None or len(set(quantized.group_bits)) == 1:
        return {"qweight": pack_bitstream_int32(quantized.codes, bits=quantized.bits), "scales": quantized.scales,
                "zeros": quantized.zeros}
    in_features = quantized.codes.shape[1]
    widths, groups, perm = segment_layout(quantized.group_bits, in_features, quantized.group_size)
    tensors = {}
    start = 0
    for b in widths:
        columns = sum(min(quantized.group_size, in_features - g * quantized.group_size) for g in groups[b])
        tensors[f"qweight_b{b}"] = pack_bitstream_int32(quantized.codes[:, perm[start : start + columns]], bits=b)
        tensors[f"scales_b{b}"] = quantized.scales[:, groups[b]].contiguous()
        tensors[f"zeros_b{b}"] = quantized.zeros[:, groups[b]].contiguous()
        start += columns
    return tensors
