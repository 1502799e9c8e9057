"""Our encoders of the GGML types (issue 42, item 2): the bytes decode alike in the ``gguf`` package and in
llama.cpp's own ``to_float``, have llama.cpp's row size, and lose no more importance-weighted error than
llama.cpp's ``ggml_quantize_chunk`` with the same importance vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from bitplan.quantizer.ggml import dequantize_ggml, dequantize_ggml_reference, quantize_ggml
from bitplan.quantizer.ggml_encode import ENCODERS, bitplan_types, check_encoder, encode_bitplan, encode_ggml, pack
from bitplan.quantizer.ggml_encode.search import integer_levels
from bitplan.quantizer.ggml_encode.types import IQ4_VALUES

TYPES = [t.name for t in bitplan_types()]


def _outlier_weight(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A gaussian weight with 0.3 % of entries eight times larger, and a heavy-tailed importance per column."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    outliers = torch.rand(rows, columns, generator=generator) < 0.003
    weight[outliers] *= 8
    importance = torch.rand(columns, generator=generator) ** 4 * 100 + 0.01
    return weight, importance


def _error(weight: torch.Tensor, importance: torch.Tensor, payload: np.ndarray, qtype: T) -> float:
    return float(((dequantize_ggml(payload, qtype) - weight) ** 2 * importance).double().sum())


@pytest.mark.parametrize("name", TYPES)
def test_our_bytes_decode_alike_in_gguf_and_llama_cpp_and_lose_less(name: str) -> None:
    qtype = T[name]
    weight, importance = _outlier_weight(48, 512, seed=1)
    ours = encode_ggml(weight, qtype, importance, encoder="bitplan")
    theirs = encode_ggml(weight, qtype, importance, encoder="llama.cpp")
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    decoded = dequantize_ggml(ours, qtype)
    assert torch.equal(decoded, dequantize_ggml_reference(ours, qtype))
    assert torch.isfinite(decoded).all()
    assert _error(weight, importance, ours, qtype) <= _error(weight, importance, theirs, qtype)


def _bundled_tensor() -> torch.Tensor:
    """SmolLM2's ``blk.0.ffn_down.weight`` (576 x 1536) from the bundled Q4_1 GGUF, its columns rotated by a
    seeded orthogonal matrix so that no weight lies on Q4_1's grid any more (as bench/float_source.py does)."""
    gguf = pytest.importorskip("gguf")
    from bitplan.sources.models import BUNDLED_MODELS

    path = BUNDLED_MODELS["smollm2-135m"].path()
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    weight = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(weight.shape[1], weight.shape[1], generator=generator,
                                              dtype=torch.float64))
    return (weight.double() @ rotation).float()


def test_summed_over_types_ours_loses_less_on_a_real_smollm2_tensor() -> None:
    weight = _bundled_tensor()
    generator = torch.Generator().manual_seed(2)
    importance = torch.rand(weight.shape[1], generator=generator) ** 4 * 100 + 0.01
    ratios = {}
    for name in TYPES:
        qtype = T[name]
        ours = _error(weight, importance, encode_bitplan(weight, qtype, importance), qtype)
        theirs = _error(weight, importance, quantize_ggml(weight, qtype, importance), qtype)
        ratios[name] = ours / theirs
    assert all(r <= 1.0 for r in ratios.values()), ratios
    assert sum(ratios.values()) / len(ratios) < 0.92, ratios  # measured 0.84 on this tensor (0.56 to 0.94)


# Q5_1 is left out: a block whose codes miss an end of 0..31 is not always found again exactly (its search
# starts from the range, whose step is then not the grid's).
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "IQ4_NL"])
def test_a_weight_already_on_the_types_grid_comes_back_exactly(name: str) -> None:
    qtype = T[name]
    weight, importance = _outlier_weight(8, 256, seed=3)
    on_grid = dequantize_ggml(quantize_ggml(weight, qtype, importance), qtype)
    again = dequantize_ggml(encode_bitplan(on_grid, qtype, importance), qtype)
    assert torch.equal(again, on_grid)


def test_fixed_q4_0_bytes_written_out() -> None:
    """d = 1.0 (fp16 0x3C00, little-endian), codes j stored in the low nibble of byte j, j + 16 in the high."""
    codes = np.array([[3] * 16 + [12] * 16], dtype=np.uint8)
    block = pack.pack_q4_0(np.array([1.0], dtype=np.float32), codes)
    assert block.tolist() == [[0b00000000, 0b00111100] + [0b11000011] * 16]


def test_fixed_q3_k_scales_written_out() -> None:
    """Scale ``i`` (stored +32) keeps its low nibble in byte ``i % 8`` (high half for ``i >= 8``) and its top
    2 bits at bits ``2 (i // 4)`` of byte ``8 + i % 4``."""
    scales = np.zeros((1, 16), dtype=np.uint8)
    scales[0, 0] = 0b110101  # 53
    scales[0, 9] = 0b011010  # 26
    packed = pack._k_scales_3(scales)
    assert packed[0, 0] == 0b0101 and packed[0, 1] == 0b1010 << 4
    assert packed[0, 8] == 0b11 and packed[0, 9] == 0b01 << 4


def test_iq4_table_lookup_is_the_nearest_level() -> None:
    levels = IQ4_VALUES
    t = torch.linspace(-140, 125, 20001)
    table = levels.tensor()
    brute = (t[:, None] - table[None, :]).abs().argmin(dim=1)
    got = levels.nearest(t)
    # exact ties (a value on a midpoint) may go either way; everything else must be the unique nearest
    distance = (t - table[got]).abs()
    assert torch.equal(distance, (t - table[brute]).abs())
    assert torch.equal(integer_levels(-4, 3).nearest(torch.tensor([-9.0, -0.6, 0.4, 2.6, 7.0])),
                       torch.tensor([0, 3, 4, 7, 7]))


def test_unknown_encoder_and_bad_importance_are_refused_with_the_fix() -> None:
    weight, importance = _outlier_weight(4, 256, seed=4)
    with pytest.raises(ValueError, match="unknown GGML encoder 'gptq'; choose one of llama.cpp, bitplan"):
        encode_ggml(weight, T.Q4_K, importance, encoder="gptq")
    with pytest.raises(ValueError, match=r"importance must be \(256,\) finite and non-negative"):
        encode_bitplan(weight, T.Q4_K, -importance)
    with pytest.raises(ValueError, match="Q4_K needs rows divisible by 256, got 96 columns"):
        encode_bitplan(weight[:, :96], T.Q4_K, importance[:96])
    assert set(ENCODERS) == {"llama.cpp", "bitplan"} and check_encoder("bitplan").version == "bitplan-1"


def test_the_bitplan_encoder_hands_the_iq2_types_to_llama_cpp() -> None:
    weight, importance = _outlier_weight(4, 256, seed=5)
    ours = encode_ggml(weight, T.IQ2_XS, importance, encoder="bitplan")
    assert np.array_equal(ours, quantize_ggml(weight, T.IQ2_XS, importance))


def test_the_job_spec_names_the_encoder_and_the_job_encodes_with_it() -> None:
    from bitplan.errors import SpecError
    from bitplan.job.quantize import encode_unit
    from bitplan.spec import JobSpec

    weight, importance = _outlier_weight(8, 256, seed=6)
    spec = JobSpec.from_flat(model="smollm2-135m", bits_per_weight=4.5, target="gguf", encoder="bitplan")
    assert spec.quantization.encoder.value == "bitplan"
    encoded = encode_unit(spec, weight, "Q4_K", {"unit": importance}, "unit")
    assert np.array_equal(encoded.payload, encode_bitplan(weight, T.Q4_K, importance))
    default = JobSpec.from_flat(model="smollm2-135m", bits_per_weight=4.5, target="gguf")
    assert np.array_equal(encode_unit(default, weight, "Q4_K", {"unit": importance}, "unit").payload,
                          quantize_ggml(weight, T.Q4_K, importance))
    with pytest.raises(SpecError, match="encoder"):
        JobSpec.from_flat(model="smollm2-135m", bits_per_weight=4.5, target="gguf", encoder="gptq")
