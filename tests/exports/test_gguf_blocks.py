"""GGUF block encoders against the gguf package's own decoders, and the llama row permutation."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bitplan.kernels.dequant import dequantize_groupwise
from bitplan.quantizer.rtn import QuantizedWeight, quantize_rtn
from bitplan.targets.exports.gguf_file import encode_unit, permute_rows_for_llama, tensor_bytes, unit_type


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


def test_issue17_units_no_ggml_type_holds_at_their_size_are_refused_reencoded_or_kept_exact() -> None:
    """An int3-g128 unit takes 3.25 bits per weight in the artifact and 5 in Q4_1 (its exact type): the export
    refuses it by default (naming it and the growth), re-encodes it with llama.cpp's quantizer into Q3_K (rows of
    256) or Q4_0 (rows of 96, which K-quants cannot hold), or keeps it exact and reports the growth. An int4-g32
    unit is exactly Q4_1's size and passes untouched."""
    from types import SimpleNamespace

    from bitplan.errors import BitplanError
    from bitplan.quantizer.formats import GgmlWeight
    from bitplan.quantizer.ggml import dequantize_ggml
    from bitplan.quantizer.rtn import dequantize_weight
    from bitplan.quantizer.sizes import stored_bytes
    from bitplan.targets.exports.gguf_file import resolve_inexact

    units = {"wide": artifact_unit(3, 128, (8, 256)), "narrow": artifact_unit(3, 32, (8, 96)),
             "fits": artifact_unit(4, 32, (8, 256))}
    manifest = SimpleNamespace(units=[SimpleNamespace(name=n, bytes=stored_bytes(u)) for n, u in units.items()])
    with pytest.raises(BitplanError, match="2 of 3 layers cannot be stored exactly") as refused:
        resolve_inexact(manifest, units, "refuse")  # type: ignore[arg-type]
    assert refused.value.param == "inexact" and "wide (int3-g128" in str(refused.value)
    kept, rows = resolve_inexact(manifest, units, "exact")  # type: ignore[arg-type]
    assert kept == units and {r["name"]: r["type"] for r in rows} == {"wide": "Q4_1", "narrow": "Q4_1"}
    assert all(r["bytes"] > r["artifact_bytes"] for r in rows)
    redone, rows = resolve_inexact(manifest, units, "reencode")  # type: ignore[arg-type]
    assert redone["fits"] is units["fits"]
    assert {r["name"]: r["type"] for r in rows} == {"wide": "Q3_K", "narrow": "Q4_0"}
    for name in ("wide", "narrow"):
        again = redone[name]
        assert isinstance(again, GgmlWeight) and again.payload.nbytes == next(r["bytes"] for r in rows
                                                                                 if r["name"] == name)
        source = dequantize_weight(units[name])
        decoded = dequantize_ggml(again.payload, gguf.GGMLQuantizationType[again.qtype]).reshape(source.shape)
        # a second rounding: within a quantization step of the artifact's own weight, never far off
        assert float((decoded - source).abs().max()) <= float(units[name].scales.float().max())
    assert next(r for r in rows if r["name"] == "wide")["bytes"] < next(
        r for r in rows if r["name"] == "wide")["exact_bytes"]
    with pytest.raises(BitplanError, match="inexact must be one of"):
        resolve_inexact(manifest, units, "maybe")  # type: ignore[arg-type]
