"""GGUF block encoders against the gguf package's own decoders, and the llama row permutation."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bitplan.exports.gguf_file import encode_unit, permute_rows_for_llama, tensor_bytes, unit_type
from bitplan.kernels.dequant import dequantize_groupwise
from bitplan.quantizer.rtn import QuantizedWeight, quantize_rtn


def artifact_unit(bits: int, group_size: int, shape: tuple[int, int] = (6, 192)) -> QuantizedWeight:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(bits * 100 + group_size))
    return quantize_rtn(weight, bits=bits, group_size=group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_blocks_decode_to_the_artifact_weights(bits: int, group_size: int) -> None:
    unit = artifact_unit(bits, group_size)
    qtype = unit_type(unit)
    assert qtype == (gguf.GGMLQuantizationType.Q4_1 if bits <= 4 else gguf.GGMLQuantizationType.Q5_1 if bits == 5
                     else gguf.GGMLQuantizationType.Q8_0)
    data = encode_unit(unit, qtype)
    assert data.dtype == np.uint8 and data.nbytes == tensor_bytes(tuple(unit.codes.shape), qtype)
    decoded = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(unit.codes.shape)
    ours = dequantize_groupwise(unit.codes, unit.scales, unit.zeros, group_size=group_size)
    if bits <= 5:  # the codes are copied; only the minimum's fp16 rounding differs
        step = unit.scales.float().max()
        assert torch.allclose(decoded, ours, atol=float(ours.abs().max()) * 2**-10)
        assert float((decoded - ours).abs().max()) < 0.01 * float(step)
    else:  # re-quantized to int8 blocks of 32
        assert float((decoded - ours).abs().max()) <= float(ours.abs().max()) / 127


def test_a_group_size_not_a_multiple_of_32_falls_back_to_q8_0() -> None:
    assert unit_type(artifact_unit(4, 16)) == gguf.GGMLQuantizationType.Q8_0


def test_q4_1_bytes_of_a_known_block() -> None:
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    unit = QuantizedWeight(codes=codes, scales=torch.tensor([[0.5]]).half(), zeros=torch.tensor([[8.0]]).half(),
                           bits=4, group_size=32)
    data = encode_unit(unit, gguf.GGMLQuantizationType.Q4_1)[0]
    assert data[:2].view(np.float16)[0] == 0.5 and data[2:4].view(np.float16)[0] == -4.0
    assert list(data[4:8]) == [0x00, 0x11, 0x22, 0x33]  # values k and k + 16 share byte k


def test_llama_permutation_is_undone_by_transformers() -> None:
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor

    weight = torch.arange(24 * 5).reshape(24, 5)
    permuted = permute_rows_for_llama(weight, n_head=3)
    assert not torch.equal(permuted, weight)
    processor = next(cls for cls in TensorProcessor.__subclasses__() if hasattr(cls, "_reverse_permute_weights"))
    restored = processor(config={})._reverse_permute_weights(permuted.numpy(), 3)
    assert np.array_equal(restored, weight.numpy())
