"""Round-to-nearest, asymmetric, group-wise quantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.dequant import dequantize_groupwise


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes with per-group scales and zero points.

    Attributes:
        codes: ``(out_features, in_features)`` uint8 in ``[0, 2**bits)``.
        scales: ``(out_features, n_groups)`` float16.
        zeros: ``(out_features, n_groups)`` float16, integer-valued.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int


def _group_view(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the input dimension to whole groups; return ``(out, n_groups, g)`` values and a validity mask."""
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group_size)
    pad = n_groups * group_size - in_features
    padded = torch.nn.functional.pad(weight, (0, pad)).reshape(out_features, n_groups, group_size)
    mask = torch.nn.functional.pad(torch.ones(in_features, dtype=torch.bool), (0, pad), value=False)
    return padded, mask.reshape(1, n_groups, group_size)


def quantize_rtn(weight: torch.Tensor, *, bits: int, group_size: int) -> QuantizedWeight:
    """Quantize each group of ``group_size`` input columns to ``bits`` bits, asymmetric.

    The range ``[min, max]`` of each group is widened to include 0 (as GPTQ does), so the zero point is an
    integer code in ``[0, 2**bits)``: ``scale = (max - min) / (2**bits - 1)`` (stored fp16),
    ``zero = round(-min / scale)``, ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``.

    Args:
        weight: ``(out_features, in_features)`` float.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    w = weight.detach().float()
    groups, mask = _group_view(w, group_size)
    inf = torch.tensor(float("inf"))
    low = torch.where(mask, groups, inf).amin(dim=2).clamp(max=0.0)
    high = torch.where(mask, groups, -inf).amax(dim=2).clamp(min=0.0)
    max_code = (1 << bits) - 1
    scales = ((high - low) / max_code).clamp(min=1e-8).to(torch.float16)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # fp16 underflow of tiny ranges
    scale = scales.float()
    zeros = torch.round(-low / scale).clamp(0, max_code)
    codes = torch.round(groups / scale.unsqueeze(2)) + zeros.unsqueeze(2)
    codes = codes.clamp(0, max_code).reshape(w.shape[0], -1)[:, : w.shape[1]].to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros.to(torch.float16), bits=bits,
                           group_size=group_size)


def quantization_error(weight: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """``dW = Q(W) - W``: the float32 error of RTN-quantizing ``weight`` at ``bits`` (every predictor's input)."""
    weight = weight.detach().float()
    return dequantize_weight(quantize_rtn(weight, bits=bits, group_size=group_size)) - weight


def dequantize_weight(quantized: QuantizedWeight) -> torch.Tensor:
    """The float32 weight the codes stand for."""
    return dequantize_groupwise(quantized.codes, quantized.scales, quantized.zeros,
                                group_size=quantized.group_size)
