"""Group-wise asymmetric dequantization (reference implementation), and the decoding of double-quantized scales."""

from __future__ import annotations

import torch


def dequantize_groupwise(
    qvalues: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, group_size: int
) -> torch.Tensor:
    """``W[o, j] = (q[o, j] - zero[o, j // g]) * scale[o, j // g]``.

    Args:
        qvalues: ``(out_features, in_features)`` uint8 codes.
        scales: ``(out_features, ceil(in_features / g))`` float16.
        zeros: ``(out_features, ceil(in_features / g))`` float16, integer-valued zero points.
        group_size: ``g``, columns per group along the input dimension; the last group may be partial.
    Returns:
        ``(out_features, in_features)`` float32.
    """
    rows, in_features = qvalues.shape
    if in_features % group_size == 0 and scales.shape[1] == in_features // group_size:  # the same arithmetic on a
        # (rows, groups, g) view, in place, instead of scales and zeros repeated to full width
        weight = torch.empty((rows, in_features), dtype=torch.float32).copy_(qvalues)  # always a fresh copy
        grouped = weight.view(rows, -1, group_size)
        grouped.sub_(zeros.float()[:, :, None]).mul_(scales.float()[:, :, None])
        return weight
    scale = scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    zero = zeros.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    return (qvalues.float() - zero) * scale


def expand_row_codes(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``low + code * step`` per row, rounded to fp16: the values :func:`bitplan.quantizer.grid.row_codes` stands
    for (double quantization of the scales). The encoder and the loader (:class:`QuantLinear`) both call this, so
    the decoded scales are the same bits in both; it lives here because kernels sit below the quantizer.

    Args:
        codes: ``(rows, n)`` integer codes.
        low, step: ``(rows,)`` the row's grid origin and step.
    Returns:
        ``(rows, n)`` float16.
    """
    return (low.float()[:, None] + codes.float() * step.float()[:, None]).to(torch.float16)
