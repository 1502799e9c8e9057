"""Quantization formats (issue 16, part 1): exact sizes, legality, round trips, and llama.cpp's encoder against
the gguf package's reference quantizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from bitplan.quantizer.formats import FORMATS, GgmlWeight, encoded_bytes, legal_formats
from bitplan.quantizer.ggml import dequantize_ggml, dequantize_ggml_reference, quantize_ggml, row_spans

SHAPE = (48, 512)


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(*SHAPE)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_issue16_every_format_round_trips_at_its_exact_size(name: str, weight: torch.Tensor) -> None:
    fmt = FORMATS[name]
    importance = torch.rand(SHAPE[1]) + 0.1
    payload = fmt.encode(weight, importance)
    size = encoded_bytes(payload)
    assert size == fmt.bytes(SHAPE)
    decoded = fmt.decode(payload)
    assert decoded.shape == weight.shape
    relative = float(((decoded - weight) ** 2).mean() / (weight**2).mean())
    assert relative < 2.0 ** (-1.2 * fmt.bits_per_weight() + 2.5), (name, relative)  # finer formats, less error


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_issue16_llama_cpp_encoder_matches_the_gguf_reference(qtype: T, weight: torch.Tensor) -> None:
    """Without an importance vector llama.cpp's legacy encoders are its reference ones, which gguf-py mirrors."""
    ours = quantize_ggml(weight, qtype)
    reference = quantize(weight.numpy().astype(np.float32), qtype)
    decoded = [FORMATS[qtype.name].decode(GgmlWeight(qtype.name, x, SHAPE)) for x in (ours, reference)]
    assert torch.allclose(decoded[0], decoded[1], atol=1e-6) and (ours == reference).mean() > 0.99


GGML_NAMES = sorted(name for name, fmt in FORMATS.items() if fmt.family == "ggml")


@pytest.mark.parametrize("name", GGML_NAMES)
def test_issue41_libggml_decoder_gives_the_gguf_packages_values(name: str) -> None:
    """The fast decoder (libggml's ``to_float``) against the slow, independent one (gguf-py's numpy), on blocks
    with outliers and an importance vector, for every GGML type we offer."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 512, generator=generator) * torch.rand(1, 512, generator=generator).pow(4) * 3
    importance = torch.rand(512, generator=generator) + 0.05
    blocks = quantize_ggml(weight, T[name], importance)
    assert torch.equal(dequantize_ggml(blocks, T[name]), dequantize_ggml_reference(blocks, T[name]))


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q6_K", "Q4_1", "Q8_0", "IQ4_XS"])
def test_issue41_rows_split_over_threads_give_the_bytes_of_one_call(name: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A large matrix is encoded in row spans on several threads: the bytes of one ``ggml_quantize_chunk`` over
    every row (uneven spans included)."""
    generator = torch.Generator().manual_seed(4)
    weight, importance = torch.randn(2051, 512, generator=generator), torch.rand(512, generator=generator) + 0.05
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert len(row_spans(2051, 512, threads=3)) == 3
    split = quantize_ggml(weight, T[name], importance)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert np.array_equal(split, quantize_ggml(weight, T[name], importance))


def test_issue41_row_spans_cover_every_row_once_and_keep_small_matrices_whole() -> None:
    for rows, columns, threads in [(1027, 512, 3), (7, 1 << 20, 16), (4096, 4096, 2), (1, 256, 8)]:
        spans = row_spans(rows, columns, threads=threads)
        assert spans[0][0] == 0 and spans[-1][1] == rows and len(spans) <= threads
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    assert row_spans(48, 512, threads=8) == [(0, 48)]


def test_issue16_legal_formats_follow_the_row_length() -> None:
    names = ["Q4_K", "Q4_0", "IQ4_XS", "int4-g128"]
    assert [f.name for f in legal_formats(names, (576, 576))] == ["Q4_0", "int4-g128"]  # SmolLM2's 576-wide rows
    assert [f.name for f in legal_formats(names, (1536, 768))] == names
    with pytest.raises(ValueError, match="unknown format 'Q9_K'"):
        legal_formats(["Q9_K"], (8, 8))
    with pytest.raises(ValueError, match="needs rows divisible by 256"):
        FORMATS["Q4_K"].encode(torch.randn(4, 576), None)
    with pytest.raises(ValueError, match="needs an importance vector"):
        FORMATS["IQ2_XXS"].encode(torch.randn(4, 256), None)


def test_issue16_formats_json_lists_every_format() -> None:
    result = subprocess.run([sys.executable, "-m", "bitplan.service.cli", "formats", "--json"], capture_output=True,
                            text=True, check=True)
    listed = {row["name"]: row for row in json.loads(result.stdout.splitlines()[-1])}
    assert set(listed) == set(FORMATS)
    assert listed["Q4_K"]["family"] == "ggml" and listed["Q4_K"]["bits_per_weight"] == 4.5
    assert listed["int4-g128"]["family"] == "bitplan-int" and listed["int4-g128"]["bits_per_weight"] == 4.25


def test_issue16_fractional_zero_grid_gives_llama_cpps_q4_1_weight_back(weight: torch.Tensor) -> None:
    """A weight llama.cpp quantized to Q4_1 (what the bundled SmolLM2 file holds) lies on a 4-bit grid of 32
    columns with an fp16 scale and minimum: ``int4-g32-fzero`` (same bytes) gives it back to fp16's rounding of
    the offset; the integer zero point of ``int4-g32`` cannot."""
    blocks = quantize_ggml(weight, T.Q4_1)
    q4_1 = FORMATS["Q4_1"].decode(GgmlWeight("Q4_1", blocks, SHAPE))
    step = float((q4_1.amax(dim=1) - q4_1.amin(dim=1)).max()) / 15  # the widest block's scale, at most
    offset = float((FORMATS["int4-g32-fzero"].roundtrip(q4_1) - q4_1).abs().max())
    integer = float((FORMATS["int4-g32"].roundtrip(q4_1) - q4_1).abs().max())
    assert offset <= 2.0**-8 * step and offset < 0.02 * integer  # fp16 holds an offset below 8 to 2**-9 of a code
    assert FORMATS["int4-g32-fzero"].bytes(SHAPE) == FORMATS["int4-g32"].bytes(SHAPE) == FORMATS["Q4_1"].bytes(SHAPE)


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, 128), (2, 64)])
def test_issue16_fractional_zero_encoder_matches_a_group_by_group_reference(bits: int, group: int) -> None:
    """The whole-matrix encoder against the obviously correct loop over groups (``q = round(w / s + z)`` on each
    group's own min and max, fp16 scale and offset), on columns that leave a partial last group, plus one row far
    from 0 (its groups take the integer grid) and one constant row."""
    from bitplan.quantizer.grid import OFFSET_ZERO_LIMIT, grid_params
    from bitplan.quantizer.rtn import quantize_offset

    torch.manual_seed(3)
    w = torch.randn(6, 3 * group + 5)
    w[4] = 50.0 + 1e-3 * torch.rand(w.shape[1])
    w[5] = 0.25
    got = quantize_offset(w, bits=bits, group_size=group)
    top = (1 << bits) - 1
    for start in range(0, w.shape[1], group):
        values = w[:, start:start + group]
        low, high = values.amin(dim=1, keepdim=True), values.amax(dim=1, keepdim=True)
        scale = ((high - low) / top).clamp(min=1e-8).half().float()
        scale[scale == 0] = 1.0
        zero = -low / scale
        far = zero.abs() > OFFSET_ZERO_LIMIT
        fallback = grid_params(low, high, bits)
        scale, zero = torch.where(far, fallback[0], scale), torch.where(far, fallback[1], zero).half().float()
        codes = (values / scale + zero).round().clamp(0, top)
        g = start // group
        assert torch.equal(got.scales[:, g:g + 1].float(), scale) and torch.equal(got.zeros[:, g:g + 1].float(), zero)
        assert torch.equal(got.codes[:, start:start + group].float(), codes)
    assert bool((got.zeros[4].float().frac() == 0).all())  # far from 0: the integer grid


@pytest.mark.parametrize(("bits", "group"), [(3, 32), (2, 64), (4, 32)])
def test_issue16_fractional_zero_range_search_matches_a_group_by_group_reference(bits: int, group: int) -> None:
    """The importance-weighted range search over whole matrices against the obvious loop: per group, every
    trimmed range in order, its fp16 scale and offset, the codes and their weighted squared error, the first least
    one kept; then the least-squares refits, each solved with ``torch.linalg.solve`` and kept where it lowers the
    error. Columns leave a partial last group; some columns weigh 0; a row far from 0 and a constant row."""
    from bitplan.quantizer.grid import OFFSET_REFITS, OFFSET_ZERO_LIMIT, offset_grid_params
    from bitplan.quantizer.rtn import OFFSET_TRIMS, quantize_offset

    torch.manual_seed(5)
    w = torch.randn(7, 3 * group + 5) * torch.rand(1, 3 * group + 5) ** 3  # uneven columns: outliers to clip
    w[5] = 50.0 + 1e-3 * torch.rand(w.shape[1])
    w[6] = 0.25
    importance = torch.rand(w.shape[1]) ** 2
    importance[::7] = 0.0
    got = quantize_offset(w, bits=bits, group_size=group, importance=importance)
    plain = quantize_offset(w, bits=bits, group_size=group)
    top = (1 << bits) - 1

    def error(values: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> float:
        codes = (values / scale + zero).round().clamp(0, top)
        return float((((codes - zero) * scale - values) ** 2 * weights).sum())

    trimmed = refitted = 0
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            values, weights = w[row, start:start + group], importance[start:start + group]
            low, high = values.min(), values.max()
            best = None
            for cut_low in OFFSET_TRIMS:
                for cut_high in OFFSET_TRIMS:
                    scale, zero = offset_grid_params(low + cut_low * (high - low), high - cut_high * (high - low), bits)
                    candidate = error(values, weights, scale, zero)
                    if best is None or candidate < best[0]:
                        best = (candidate, scale, zero)
            for _ in range(OFFSET_REFITS):  # weighted least squares for (d, m) in d * q + m given the codes
                codes = (values / best[1] + best[2]).round().clamp(0, top)
                design = torch.stack([codes, torch.ones_like(codes)], dim=1).double()
                gram = design.T @ (design * weights.double()[:, None])
                if torch.linalg.det(gram) <= 1e-9 * gram[0, 0] * gram[1, 1]:
                    break
                d, m = torch.linalg.solve(gram, design.T @ (weights.double() * values.double())).float()
                scale = d.half().float()
                zero = (-m / scale).half().float()
                if scale <= 0 or not zero.abs() <= OFFSET_ZERO_LIMIT:
                    break
                candidate = error(values, weights, scale, zero)
                if candidate < best[0]:
                    best = (candidate, scale, zero)
                    refitted += 1
            g = start // group
            scale, zero = got.scales[row, g].float(), got.zeros[row, g].float()
            assert error(values, weights, scale, zero) == pytest.approx(best[0], rel=1e-5, abs=1e-12), (row, g)
            assert torch.equal(got.codes[row, start:start + group].float(),
                               (values / scale + zero).round().clamp(0, top))
            untrimmed = error(values, weights, plain.scales[row, g].float(), plain.zeros[row, g].float())
            assert best[0] <= untrimmed
            trimmed += best[0] < untrimmed
    assert trimmed > w.shape[0]  # the search did move ranges (and never raised a group's error)
    assert refitted > w.shape[0]  # and the refits moved grids
    assert torch.equal(got.scales[6], plain.scales[6]) and torch.equal(got.zeros[6], plain.zeros[6])


def test_issue16_fractional_zero_range_search_keeps_a_q4_1_weight() -> None:
    """With an importance vector the search keeps a weight already on the grid (the SmolLM2 file's Q4_1 blocks)
    where it is: the whole range comes first and no trimmed one rounds it with less error."""
    torch.manual_seed(0)
    source = torch.randn(*SHAPE)
    q4_1 = FORMATS["Q4_1"].decode(GgmlWeight("Q4_1", quantize_ggml(source, T.Q4_1), SHAPE))
    importance = torch.rand(SHAPE[1]) + 0.01
    fmt = FORMATS["int4-g32-fzero"]
    searched = fmt.decode(fmt.encode(q4_1, importance))
    assert torch.equal(searched, fmt.decode(fmt.encode(q4_1, None)))


@pytest.mark.parametrize(("bits", "group", "scale_bits"), [(4, 32, 4), (3, 64, 6), (2, 32, 8)])
def test_issue16_double_quantized_scales_match_a_row_by_row_reference(bits: int, group: int, scale_bits: int) -> None:
    """``quantize_offset(scale_bits=k)`` against the obvious loop: each row's fp16 scales and zeros (the ``-fzero``
    grid) put on that row's own ``k``-bit linear grid (low = the row's minimum, step = range / (2**k - 1), both
    fp16), decoded to fp16, and the weight's codes rounded against the decoded values; columns that leave a
    partial last group, and a constant row (step 0)."""
    from bitplan.quantizer.rtn import quantize_offset

    torch.manual_seed(4)
    w = torch.randn(5, 3 * group + 7) * torch.linspace(0.1, 2.0, 3 * group + 7)
    w[4] = 0.5
    plain = quantize_offset(w, bits=bits, group_size=group)
    got = quantize_offset(w, bits=bits, group_size=group, scale_bits=scale_bits)
    top = (1 << scale_bits) - 1
    for row in range(w.shape[0]):
        for values, codes, decoded, column in ((plain.scales, got.scale_codes, got.scales, 0),
                                               (plain.zeros, got.zero_codes, got.zeros, 2)):
            low = values[row].float().min().half().float()
            step = ((values[row].float().max() - low) / top).half().float()
            assert float(got.scale_range[row, column]) == float(low)
            assert float(got.scale_range[row, column + 1]) == float(step)
            for g in range(values.shape[1]):
                code = 0 if step == 0 else int(((values[row, g].float() - low) / step).round().clamp(0, top))
                assert int(codes[row, g]) == code
                assert float(decoded[row, g]) == float((low + code * step).half())
        for start in range(0, w.shape[1], group):
            g = start // group
            scale, zero = float(got.scales[row, g]), float(got.zeros[row, g])
            expected = (w[row, start:start + group] / scale + zero).round().clamp(0, (1 << bits) - 1)
            assert torch.equal(got.codes[row, start:start + group].float(), expected)
    assert bool((got.scales.float() > 0).all())


def test_issue16_double_quantized_scales_keep_a_q4_1_weight_and_cost_a_quarter_bit(weight: torch.Tensor) -> None:
    """On a weight llama.cpp encoded to Q4_1 (SmolLM2's own blocks), ``int4-g32-fzero-dq8`` is within a small
    fraction of a code of it and ``-dq4`` still far closer than ``int4-g128``, at the sizes the formats say: a
    quarter (``-dq4``) or half (``-dq8``) a bit per weight of scales and zeros plus four fp16 values a row."""
    blocks = quantize_ggml(weight, T.Q4_1)
    q4_1 = FORMATS["Q4_1"].decode(GgmlWeight("Q4_1", blocks, SHAPE))
    error = {name: float(((FORMATS[name].roundtrip(q4_1) - q4_1) ** 2).mean() / (q4_1**2).mean())
             for name in ("int4-g32-fzero-dq8", "int4-g32-fzero-dq4", "int4-g128")}
    assert error["int4-g32-fzero-dq8"] < 1e-3 * error["int4-g128"]
    assert error["int4-g32-fzero-dq4"] < 0.3 * error["int4-g128"]
    rows, columns = SHAPE
    for k in (4, 8):
        codes, scale_codes = rows * columns // 2, 2 * rows * columns // 32 * k // 8
        assert FORMATS[f"int4-g32-fzero-dq{k}"].bytes(SHAPE) == codes + scale_codes + 8 * rows


def test_issue16_quant_linear_decodes_double_quantized_scales_when_loaded() -> None:
    """A ``QuantLinear`` with ``scale_bits`` stores the scale and zero codes (not fp16 scales), computes exactly the
    encoder's weight from them, and follows a second load of other codes."""
    from bitplan.kernels.quant_linear import QuantLinear
    from bitplan.quantizer.mixed import pack_segments
    from bitplan.quantizer.rtn import dequantize_weight, quantize_offset

    torch.manual_seed(5)
    first, second = torch.randn(24, 100), torch.randn(24, 100)
    layer = QuantLinear(100, 24, bits=3, group_size=32, bias=False, scale_bits=6)
    assert set(layer.state_dict()) == {"qweight", "scales_q", "zeros_q", "scale_range"}
    for w in (first, second):
        q = quantize_offset(w, bits=3, group_size=32, scale_bits=6)
        layer.load_state_dict(pack_segments(q))
        assert torch.equal(layer.dequantized_weight(), dequantize_weight(q))
        x = torch.randn(2, 100)
        assert torch.allclose(layer(x), x @ dequantize_weight(q).T, atol=1e-5)
        codes, scales, zeros = layer.codes_scales_zeros()  # what the exports read
        assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales) and torch.equal(zeros, q.zeros)
    with pytest.raises(ValueError, match="one width"):
        QuantLinear(64, 8, bits=4, group_size=32, bias=False, group_bits=[3, 4], scale_bits=4)


@pytest.fixture()
def no_remembered_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitplan.quantizer import ggml

    monkeypatch.setattr(ggml, "_sources", {})
    monkeypatch.setattr(ggml, "_indexes", {})


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q6_K])
def test_issue16_a_weight_decoded_from_source_blocks_gets_them_back(qtype: T, weight: torch.Tensor,
                                                                      no_remembered_sources: None) -> None:
    """A GGUF source's layer kept in its own type is its source blocks byte for byte (rows in any order: transformers
    reorders llama's q/k), where llama.cpp's quantizer handed the decoded values would find other blocks; anything
    not exactly decoded from them (one value changed, another type) is llama.cpp's encoding as before."""
    from bitplan.quantizer.ggml import dequantize_ggml, remember_source_blocks

    importance = torch.rand(SHAPE[1]) + 0.1
    blocks = quantize_ggml(weight, qtype, importance)  # a "source file's" tensor
    loaded = dequantize_ggml(blocks, qtype)  # what a loader holds
    again = quantize_ggml(loaded, qtype, importance)  # llama.cpp from the decoded values: not always the same blocks
    remember_source_blocks("other.gguf", [(T.Q8_0, quantize_ggml(weight, T.Q8_0))])
    remember_source_blocks("source.gguf", [(qtype, blocks)])
    assert np.array_equal(quantize_ggml(loaded, qtype, importance), blocks)
    assert np.array_equal(quantize_ggml(loaded, qtype), blocks)  # whatever the importance
    order = torch.randperm(SHAPE[0], generator=torch.Generator().manual_seed(1))
    assert np.array_equal(quantize_ggml(loaded[order], qtype, importance), blocks[order.numpy()])
    changed = loaded.clone()
    changed[3, 7] += 0.5
    remembered_not = quantize_ggml(changed, qtype, importance)
    remember_source_blocks("source.gguf", [])
    assert np.array_equal(remembered_not, quantize_ggml(changed, qtype, importance))
    assert np.array_equal(quantize_ggml(loaded, qtype, importance), again)  # forgotten: llama.cpp's own again


def test_issue16_only_the_last_source_files_are_kept(weight: torch.Tensor, no_remembered_sources: None) -> None:
    from bitplan.quantizer import ggml

    blocks = quantize_ggml(weight, T.Q4_0)
    loaded = ggml.dequantize_ggml(blocks, T.Q4_0)
    ggml.remember_source_blocks("first.gguf", [(T.Q4_0, blocks)])
    assert ggml.source_blocks_for(loaded.numpy(), T.Q4_0) is not None
    for name in [f"later-{i}.gguf" for i in range(ggml.SOURCES_KEPT)]:
        ggml.remember_source_blocks(name, [])
    assert ggml.source_blocks_for(loaded.numpy(), T.Q4_0) is None and "first.gguf" not in ggml._sources
    assert not ggml._indexes
