"""``QuantLinear``: a linear layer whose weight is stored bit-packed with fp16 group scales and zero points."""

from __future__ import annotations

import torch
from torch import nn

from kernels.bitpack import packed_words, unpack_bitstream_int32
from kernels.dequant import dequantize_groupwise


class QuantLinear(nn.Module):
    """Linear layer over a packed weight (format ``bitstream-int32``, see :mod:`kernels.bitpack`).

    Buffers: ``qweight (ceil(out*in*bits/32),) int32``, ``scales`` and ``zeros``
    ``(out, ceil(in/group_size)) float16``, optional ``bias (out,)``. The forward pass uses the torch
    reference dequantization and keeps the dequantized weight cached (CPU path).
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        n_groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(packed_words(out_features * in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._weight_cache: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``(out_features, in_features)`` float32 this layer computes with."""
        codes = unpack_bitstream_int32(self.qweight, bits=self.bits, count=self.out_features * self.in_features)
        codes = codes.reshape(self.out_features, self.in_features)
        return dequantize_groupwise(codes, self.scales, self.zeros, group_size=self.group_size)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self._weight_cache = None
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_cache is None or self._weight_cache.device != x.device:
            self._weight_cache = self.dequantized_weight().to(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self._weight_cache.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"
