"""Weight quantizers and the exact size of every quantization option."""

from bitplan.quantizer.rtn import QuantizedWeight, dequantize_weight, quantize_rtn
from bitplan.quantizer.sizes import quantized_bytes

__all__ = ["QuantizedWeight", "dequantize_weight", "quantize_rtn", "quantized_bytes"]
