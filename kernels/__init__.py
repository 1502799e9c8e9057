"""Low-level tensor kernels: bit packing, group-wise dequantization and the ``QuantLinear`` module.

Every routine here is a pure-torch reference; faster Triton versions must match it.
"""

from bitplan.kernels.bitpack import pack_bitstream_int32, packed_words, unpack_bitstream_int32
from bitplan.kernels.dequant import dequantize_groupwise
from bitplan.kernels.quant_linear import QuantLinear

__all__ = ["QuantLinear", "dequantize_groupwise", "pack_bitstream_int32", "packed_words", "unpack_bitstream_int32"]
