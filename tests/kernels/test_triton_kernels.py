"""The Triton kernels against their torch references, in the interpreter on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install '.[test]' installs it)")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)",
                allow_module_level=True)

from bitplan.kernels.bitpack import pack_bitstream_int32  # noqa: E402
from bitplan.kernels.triton_kernels import (  # noqa: E402
    reference_dequantize,
    reference_matmul,
    triton_dequantize,
    triton_matmul,
)
from bitplan.quantizer.rtn import quantize_rtn  # noqa: E402


def packed(rows: int, cols: int, bits: int, group_size: int, seed: int = 0):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q = quantize_rtn(weight, bits=bits, group_size=group_size)
    return pack_bitstream_int32(q.codes, bits=bits), q.scales, q.zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize(("rows", "cols", "group_size"), [(16, 64, 32), (33, 96, 64), (7, 200, 128)])
def test_dequantize_matches_reference_exactly(bits: int, rows: int, cols: int, group_size: int) -> None:
    words, scales, zeros = packed(rows, cols, bits, group_size, seed=bits)
    args = {"bits": bits, "rows": rows, "cols": cols, "group_size": group_size}
    assert torch.equal(triton_dequantize(words, scales, zeros, **args), reference_dequantize(words, scales, zeros,
                                                                                             **args))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("batch", [1, 16, 70])
def test_fused_matmul_matches_reference(bits: int, batch: int) -> None:
    rows, cols, group_size = 80, 192, 64
    words, scales, zeros = packed(rows, cols, bits, group_size, seed=batch)
    x = torch.randn(batch, cols)
    args = {"bits": bits, "rows": rows, "cols": cols, "group_size": group_size}
    expected = reference_matmul(x, words, scales, zeros, **args)
    got = triton_matmul(x, words, scales, zeros, **args)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    doubled = triton_matmul(x, words, scales, zeros, **args, out=got.clone())
    torch.testing.assert_close(doubled, 2 * expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 16])
def test_quant_linear_mixed_widths_triton_path_matches_reference(batch: int) -> None:
    from bitplan.kernels.quant_linear import QuantLinear
    from bitplan.quantizer.mixed import pack_segments, quantize_rtn_mixed

    group_bits = (4, 3, 2, 3, 4, 2)
    weight = torch.randn(48, 192)
    layer = QuantLinear(192, 48, bits=4, group_size=32, bias=True, group_bits=group_bits)
    layer.load_state_dict({**pack_segments(quantize_rtn_mixed(weight, group_bits, group_size=32)),
                           "bias": torch.randn(48)})
    x = torch.randn(2, batch, 192)
    torch.testing.assert_close(layer.forward_triton(x), layer(x), rtol=1e-4, atol=1e-4)
