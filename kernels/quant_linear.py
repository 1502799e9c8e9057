"""``QuantLinear``: a linear layer whose weight is stored bit-packed with fp16 group scales and zero points.

Mixed widths inside one matrix (layout ``segments-by-width``): column group ``g`` (input columns
``[g * group_size, (g + 1) * group_size)``) has width ``group_bits[g]``. The groups are ordered by width, stably
(:func:`segment_layout`), so the columns of equal width are contiguous: segment ``b`` is a dense
``(out_features, K_b)`` code matrix packed on its own at ``b`` bits, with its own ``(out_features, n_groups_b)``
scales and zeros. The forward pass gathers the input columns in that order once and sums one matmul per
segment. A partial last group (``in_features`` not a multiple of ``group_size``) is the last group of its
segment, so ``k // group_size`` indexes a segment's groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bitplan.kernels.bitpack import packed_words, unpack_bitstream_int32
from bitplan.kernels.dequant import expand_row_codes
from bitplan.kernels.triton_kernels import reference_dequantize, triton_available, triton_matmul


def segment_layout(group_bits: Sequence[int], in_features: int, group_size: int
                   ) -> tuple[list[int], dict[int, list[int]], torch.Tensor]:
    """Widths in ascending order, the groups of each width (original order kept) and the input column
    permutation ``perm`` (``x[..., perm]`` puts the columns in segment order)."""
    widths = sorted(set(group_bits))
    groups = {b: [g for g, gb in enumerate(group_bits) if gb == b] for b in widths}
    columns = [torch.arange(g * group_size, min((g + 1) * group_size, in_features))
               for b in widths for g in groups[b]]
    return widths, groups, torch.cat(columns)


class QuantLinear(nn.Module):
    """Linear layer over a packed weight (format ``bitstream-int32``, see :mod:`kernels.bitpack`).

    One width (``group_bits`` ``None``): buffers ``qweight (ceil(out*in*bits/32),) int32``, ``scales`` and
    ``zeros`` ``(out, ceil(in/group_size)) float16``. Mixed widths: ``qweight_b{b}``, ``scales_b{b}``,
    ``zeros_b{b}`` per segment (module docstring). ``scale_bits`` (one width): the scales and zeros are stored
    double-quantized, ``scales_q`` and ``zeros_q`` packed ``scale_bits``-bit codes with ``scale_range (out, 4)
    float16`` (scale low and step, zero low and step per row); ``scales`` and ``zeros`` are then decoded from them
    (not stored) whenever those change. Optional ``bias (out,)``. On a CUDA device with Triton the
    forward pass runs the fused dequantize-matmul kernel; elsewhere it dequantizes once with the torch reference
    and caches the float weight.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool,
                 group_bits: Sequence[int] | None = None, scale_bits: int | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        n_groups = -(-in_features // group_size)
        if group_bits is not None and len(group_bits) != n_groups:
            raise ValueError(f"group_bits needs {n_groups} widths, got {len(group_bits)}")
        self.group_bits = None if group_bits is None or len(set(group_bits)) == 1 else tuple(group_bits)
        self.bits = bits if self.group_bits is None else max(self.group_bits)
        if scale_bits is not None and self.group_bits is not None:
            raise ValueError("double-quantized scales (scale_bits) need one width for the whole layer")
        self.scale_bits = scale_bits
        self._expanded_from: tuple[int, ...] | None = None
        if self.group_bits is None:
            self.segments = [(bits, "", in_features, n_groups)]
            self.register_buffer("perm", None)
        else:
            widths, groups, perm = segment_layout(self.group_bits, in_features, group_size)
            self.segments = []
            for b in widths:
                columns = sum(min(group_size, in_features - g * group_size) for g in groups[b])
                self.segments.append((b, f"_b{b}", columns, len(groups[b])))
            self.register_buffer("perm", perm, persistent=False)
        for b, suffix, columns, groups_b in self.segments:
            self.register_buffer(f"qweight{suffix}",
                                 torch.zeros(packed_words(out_features * columns, b), dtype=torch.int32))
            stored = scale_bits is None
            self.register_buffer(f"scales{suffix}", torch.zeros(out_features, groups_b, dtype=torch.float16),
                                 persistent=stored)
            self.register_buffer(f"zeros{suffix}", torch.zeros(out_features, groups_b, dtype=torch.float16),
                                 persistent=stored)
        if scale_bits is not None:
            for leaf in ("scales_q", "zeros_q"):
                self.register_buffer(leaf, torch.zeros(packed_words(out_features * n_groups, scale_bits),
                                                       dtype=torch.int32))
            self.register_buffer("scale_range", torch.zeros(out_features, 4, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._weight_cache: torch.Tensor | None = None

    def _segment_tensors(self, suffix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.scale_bits is not None:
            self._expand_scales()
        return getattr(self, f"qweight{suffix}"), getattr(self, f"scales{suffix}"), getattr(self, f"zeros{suffix}")

    def _expand_scales(self) -> None:
        """``scales`` and ``zeros`` from their codes (:func:`bitplan.kernels.dequant.expand_row_codes`, the
        encoder's own arithmetic), again only when the stored codes changed (loaded, replaced or moved)."""
        stored = (self.scales_q, self.zeros_q, self.scale_range)
        key = tuple(x for t in stored for x in (id(t), t.data_ptr(), t._version))
        if key == self._expanded_from:
            return
        rows, n_groups = self.scales.shape
        ranges = self.scale_range.float().cpu()
        for leaf, words, column in (("scales", self.scales_q, 0), ("zeros", self.zeros_q, 2)):
            codes = unpack_bitstream_int32(words.cpu(), bits=int(self.scale_bits), count=rows * n_groups)
            values = expand_row_codes(codes.reshape(rows, n_groups), ranges[:, column], ranges[:, column + 1])
            setattr(self, leaf, values.to(words.device))
        self._expanded_from = key
        self._weight_cache = None

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``(out_features, in_features)`` float32 this layer computes with."""
        parts = []
        for b, suffix, columns, _ in self.segments:
            words, scales, zeros = self._segment_tensors(suffix)
            parts.append(reference_dequantize(words, scales, zeros, bits=b, rows=self.out_features, cols=columns,
                                              group_size=self.group_size))
        if self.perm is None:
            return parts[0]
        weight = torch.empty(self.out_features, self.in_features, device=parts[0].device)
        weight[:, self.perm.to(weight.device)] = torch.cat(parts, dim=1)
        return weight

    def codes_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes ``(out, in)`` uint8, scales and zeros ``(out, n_groups)`` float16, in the original column and
        group order (the exporters' input)."""
        codes, scales, zeros = [], [], []
        for b, suffix, columns, _ in self.segments:
            words, s, z = self._segment_tensors(suffix)
            codes.append(unpack_bitstream_int32(words.cpu(), bits=b, count=self.out_features * columns)
                         .reshape(self.out_features, columns))
            scales.append(s.cpu())
            zeros.append(z.cpu())
        if self.perm is None:
            return codes[0], scales[0], zeros[0]
        widths, groups, perm = segment_layout(self.group_bits, self.in_features, self.group_size)
        order = torch.tensor([g for b in widths for g in groups[b]])
        all_codes = torch.empty(self.out_features, self.in_features, dtype=torch.uint8)
        all_codes[:, perm] = torch.cat(codes, dim=1)
        all_scales = torch.empty(self.out_features, len(order), dtype=torch.float16)
        all_zeros = torch.empty_like(all_scales)
        all_scales[:, order] = torch.cat(scales, dim=1)
        all_zeros[:, order] = torch.cat(zeros, dim=1)
        return all_codes, all_scales, all_zeros

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self._weight_cache = None
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_available():
            return self.forward_triton(x)
        if self._weight_cache is None or self._weight_cache.device != x.device:
            self._weight_cache = self.dequantized_weight().to(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self._weight_cache.to(x.dtype), bias)

    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel path: one dequantize-matmul per segment, accumulated in float32."""
        flat = x.reshape(-1, self.in_features)
        if self.perm is not None:
            flat = flat[:, self.perm.to(flat.device)]
        out = None
        start = 0
        for b, suffix, columns, _ in self.segments:
            words, scales, zeros = self._segment_tensors(suffix)
            out = triton_matmul(flat[:, start : start + columns], words, scales, zeros, bits=b,
                                rows=self.out_features, cols=columns, group_size=self.group_size, out=out)
            start += columns
        if self.bias is not None:
            out += self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        widths = self.bits if self.group_bits is None else f"mixed {sorted(set(self.group_bits))}"
        double = "" if self.scale_bits is None else f", scale_bits={self.scale_bits}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={widths}, " \
               f"group_size={self.group_size}{double}"
