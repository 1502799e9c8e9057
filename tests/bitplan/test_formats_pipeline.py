"""Formats as allocation options (issue 16, parts 2-3), end to end: the allocator chooses among the formats legal
for each shape, the artifact stores and loads what was chosen, and jobs asking for formats they cannot have are
refused (the sensitivity pass with formats: ``test_formats_sensitivity.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitplan.errors import BitplanError, BudgetError, SpecError
from bitplan.job.pipeline import run_pipeline
from bitplan.quantizer.formats import FORMATS, PRESETS, decode_weight, resolve_formats
from bitplan.sensitivity.importance import input_energy
from bitplan.sources.models import load_model
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec
from bitplan.targets.artifact import MANIFEST, load_artifact
from bitplan.targets.exports import export_artifact
from tests.conftest import _word_tokenizer

SMALL = {"num_samples": 2, "seq_len": 32}


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama whose attention inputs are 256 wide (K-quants legal) and whose MLP input is 96 wide
    (only 32-blocks and integer grids legal): both cases of SmolLM2 (576 and 1536) in miniature."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    folder = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    _word_tokenizer(512).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gguf_run(wide_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs") / "gguf-k"
    spec = JobSpec.from_flat(model=str(wide_llama_dir), bits_per_weight=4.6, formats="gguf-k", tie_fused=True, **SMALL)
    return run_pipeline(spec, out=out)


def test_issue16_units_take_only_formats_legal_for_their_shape(gguf_run, wide_llama_dir: Path) -> None:
    units = find_units(load_model(str(wide_llama_dir)).model)
    assert gguf_run.status == "optimal" and gguf_run.bits_per_weight <= 4.6
    assert gguf_run.bytes == gguf_run.predicted_bytes
    chosen = {u["name"]: u["format"] for u in gguf_run.units}
    assert set(chosen.values()) <= set(PRESETS["gguf-k"])
    for name, fmt in chosen.items():
        assert FORMATS[fmt].legal((units[name].out_features, units[name].in_features)), (name, fmt)
    down = [f for n, f in chosen.items() if n.endswith("down_proj")]  # 96 wide: no K-quant can hold it
    assert all(not f.endswith("_K") for f in down)
    assert len(set(chosen.values())) > 1, "a 4.6-bpw budget between Q4_0 and Q8_0 should mix formats"
    for layer in range(2):  # tied siblings share one format
        prefix = f"model.layers.{layer}."
        assert len({chosen[prefix + f"self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert chosen[prefix + "mlp.gate_proj"] == chosen[prefix + "mlp.up_proj"]


def test_issue16_manifest_records_formats_and_the_loader_rebuilds_them(gguf_run, wide_llama_dir: Path) -> None:
    path = Path(gguf_run.artifact)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format_version"] == 5 and manifest["formats"] == list(PRESETS["gguf-k"])
    by_name = {u["name"]: u for u in manifest["units"]}
    for unit in gguf_run.units:
        record = by_name[unit["name"]]
        assert record["format"] == unit["format"]
        assert record["bytes"] == FORMATS[unit["format"]].bytes((record["out_features"], record["in_features"]))
    assert sum(u["bytes"] for u in manifest["units"]) == gguf_run.bytes == manifest["achieved"]["bytes"]
    # the loaded artifact computes with exactly the decoded formats (llama.cpp's encoder, our importance)
    loaded_model, _, _ = load_artifact(path)
    source = load_model(str(wide_llama_dir))
    units = find_units(source.model)
    spec = JobSpec.from_flat(model=str(wide_llama_dir), bits_per_weight=4.6, formats="gguf-k", **SMALL)
    from bitplan.job.quantize import encode_unit
    from bitplan.sources.calibration import build_calibration_set

    calib = build_calibration_set(source.tokenizer, text_file=None, num_samples=2, seq_len=32, seed=0)
    importance = input_energy(source.model, units, list(torch.split(calib.tokens, 1)))
    with torch.no_grad():
        for unit in gguf_run.units:
            weight = units[unit["name"]].weight
            weight.copy_(decode_weight(encode_unit(spec, weight, unit["format"], importance, unit["name"])))
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded_model(tokens).logits, source.model(tokens).logits, atol=1e-5)


def test_issue16_integer_formats_mix_group_sizes_and_grids(wide_llama_dir: Path, tmp_path: Path) -> None:
    formats = "int3-g32,int4-g64-sym,int4-g128,int8-g32"
    run = run_pipeline(JobSpec.from_flat(model=str(wide_llama_dir), bits_per_weight=4.3, formats=formats, **SMALL),
                       out=tmp_path / "int")
    chosen = {u["format"] for u in run.units}
    assert chosen <= set(formats.split(",")) and len(chosen) > 1
    assert run.bits_per_weight <= 4.3 and run.bytes == run.predicted_bytes
    for unit in run.units:
        assert unit["group_size"] == int(unit["format"].split("-g")[1].split("-")[0])
    model, _, manifest = load_artifact(Path(run.artifact))
    assert {u.format for u in manifest.units} == chosen
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 512, (1, 16))).logits).all()


def one_format_budget(model: torch.nn.Module, fmt: str) -> float:
    """The bits per weight of every unit of ``model`` in ``fmt``: the one budget a job with that format alone meets."""
    shapes = [tuple(m.weight.shape) for m in find_units(model).values()]
    return 8 * sum(FORMATS[fmt].bytes(s) for s in shapes) / sum(r * c for r, c in shapes) + 1e-9


@pytest.mark.parametrize("fmt", ["int4-g32-fzero", "int4-g32-fzero-dq4"])
def test_issue16_fractional_zero_grids_load_in_the_packed_folder(fmt: str, wide_llama_dir: Path,
                                                                 tmp_path: Path) -> None:
    """Every layer in ``int4-g32-fzero`` (or with its scales and zeros double-quantized, ``-dq4``): the packed
    folder stores the fractional fp16 zero points as they are (or their 4-bit codes and each row's grid), and the
    loaded ``QuantLinear`` layers hold exactly the format's own ``decode(encode(W))``."""
    from safetensors import safe_open

    source = load_model(str(wide_llama_dir)).model
    budget = one_format_budget(source, fmt)
    run = run_pipeline(JobSpec.from_flat(model=str(wide_llama_dir), bits_per_weight=budget, formats=fmt, **SMALL),
                       out=tmp_path / "fzero")
    assert {u["format"] for u in run.units} == {fmt} and run.bytes == run.predicted_bytes
    model, _, manifest = load_artifact(Path(run.artifact))
    from bitplan.job.quantize import encode_unit
    from bitplan.sources.calibration import build_calibration_set

    loaded = load_model(str(wide_llama_dir))
    calib = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=2, seq_len=32, seed=0)
    importance = input_energy(source, find_units(source), list(torch.split(calib.tokens, 1)))
    spec = JobSpec.from_flat(model=str(wide_llama_dir), bits_per_weight=budget, formats=fmt, **SMALL)
    fractional = searched = 0
    for unit in manifest.units:
        layer = model.get_submodule(unit.name)
        weight = source.get_submodule(unit.name).weight.detach().float()
        expected = decode_weight(encode_unit(spec, weight, fmt, importance, unit.name))  # the job's importance
        searched += not torch.equal(expected, FORMATS[fmt].roundtrip(weight))  # its range search moved groups
        assert torch.equal(layer.dequantized_weight(), expected), unit.name
        fractional += int((layer.codes_scales_zeros()[2].float().frac() != 0).sum())
        assert unit.bytes == FORMATS[fmt].bytes((unit.out_features, unit.in_features))
    assert fractional > 0 and searched > 0  # the zero points were not rounded on the way; the ranges searched
    assert run.bits_per_weight <= budget and manifest.achieved.bytes == run.bytes
    with safe_open(str(Path(run.artifact) / "quantized.safetensors"), "pt") as stored:
        leaves = {key.rsplit(".", 1)[1] for key in stored.keys()}
    assert leaves == ({"qweight", "scales_q", "zeros_q", "scale_range"} if "-dq" in fmt else
                      {"qweight", "scales", "zeros"})
    from_pretrained_matches_our_loader(Path(run.artifact))  # transformers' own loader, same logits
    with pytest.raises(BitplanError, match="fractional zero points") as caught:  # its integer zero points cannot
        export_artifact(Path(run.artifact), format="compressed-tensors", out=tmp_path / "ct")
    assert caught.value.param == "format" and not (tmp_path / "ct").exists()


def test_issue16_gptq_encodes_integer_formats_and_the_allocator_is_told_its_error(wide_llama_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """``--quantizer gptq`` with integer grid formats (asymmetric and symmetric, mixed group sizes): every unit is
    GPTQ-encoded in its chosen format on the calibration Grams, the sensitivity pass was told GPTQ's error of each
    option (``decode(GPTQ(W)) - W``, the same weights the artifact holds), and GPTQ's layer-output error is below
    round to nearest's in the same format."""
    from bitplan.job.quantize import encode_unit, input_grams
    from bitplan.job.sensitivity_pass import format_errors
    from bitplan.sources.calibration import build_calibration_set

    formats = "int3-g32,int4-g64-sym,int4-g128,int8-g32"
    spec = JobSpec.from_flat(model=str(wide_llama_dir), bits_per_weight=4.3, formats=formats, quantizer="gptq", **SMALL)
    run = run_pipeline(spec, out=tmp_path / "gptq")
    assert {u["format"] for u in run.units} <= set(formats.split(",")) and run.bits_per_weight <= 4.3
    model, _, manifest = load_artifact(Path(run.artifact))
    assert manifest.run is not None and manifest.run.quantizer.startswith("gptq")
    source = load_model(str(wide_llama_dir))
    units = find_units(source.model)
    calib = build_calibration_set(source.tokenizer, text_file=None, num_samples=SMALL["num_samples"],
                                  seq_len=SMALL["seq_len"], seed=0)
    grams = input_grams(source, units, calib.tokens, None, None)
    _, error_of = format_errors(spec, units, None, grams)
    for unit in run.units:
        name, fmt = unit["name"], unit["format"]
        weight = units[name].weight.detach().float()
        told = error_of(name, fmt)
        gptq = decode_weight(encode_unit(spec, weight, fmt, None, name, grams[name]))
        assert torch.equal(told, gptq - weight), name  # the allocator saw the error of what was written
        held = model.get_submodule(name).dequantized_weight().float()
        assert torch.allclose(held, gptq, atol=1e-6), name
        rtn = FORMATS[fmt].roundtrip(weight)
        output_error = {k: float(torch.einsum("oi,ij,oj->", d, grams[name], d)) for k, d in
                        (("gptq", gptq - weight), ("rtn", rtn - weight))}
        assert output_error["gptq"] < output_error["rtn"], (name, fmt, output_error)


@pytest.mark.parametrize(("flat", "param", "message"), [
    ({"formats": "Q9_K"}, "formats", "unknown format 'Q9_K'"),
    ({"formats": "gguf-k", "quantizer": "gptq"}, "formats", "GPTQ encodes the integer grid formats.*'Q2_K' is "
     "encoded by llama.cpp's own quantizer"),
    ({"formats": "int4-g32,Q8_0", "quantizer": "gptq-salience"}, "formats", "'Q8_0' is encoded by llama.cpp"),
    ({"formats": "bitplan-mix", "quantizer": "gptq"}, "formats", "'int3-g32-fzero-dq4' has a fractional zero point"),
    ({"formats": "gguf-k", "mix_groups": True}, "formats", "does not combine with --formats"),
    ({"formats": "gguf-k", "pinned": ["*=7"]}, "pinned", "no candidate format has 7 bits"),
    ({"formats": "gguf-k", "kl_refine_windows": 1}, "kl_refine_windows", "does not yet combine"),
])
def test_issue16_bad_format_jobs_are_refused_with_the_field_named(flat: dict, param: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        JobSpec.from_flat(model="x", bits_per_weight=4.5, **flat)
    assert caught.value.param == param


def test_issue16_uniform_bits_and_formats_are_refused() -> None:
    with pytest.raises(SpecError, match="uniform baseline takes"):
        JobSpec.from_flat(model="x", uniform_bits=4, formats="gguf-k")


def test_issue16_a_shape_no_candidate_can_store_is_explained(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="no candidate format can store") as caught:  # hidden 64: no K-quant
        run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=4.5, formats="Q4_K,Q6_K", **SMALL),
                     out=tmp_path / "x")
    assert caught.value.param == "formats"


@pytest.mark.parametrize(("flat", "expected"), [
    ({}, "bitplan-mix"),
    ({"bytes": 10_000}, "bitplan-mix"),
    ({"formats": "bitplan-default"}, None),
    ({"candidate_bits": (2, 3, 4)}, None),
    ({"group_size": 64}, None),
    ({"quantizer": "gptq"}, None),
    ({"quantizer": "rtn"}, None),
    ({"mix_groups": True}, None),
    ({"kl_refine_windows": 2, "num_samples": 8}, None),
    ({"target": "gguf"}, "gguf-k"),
])
def test_issue16_the_default_set_is_bitplan_mix_where_the_job_allows_it(flat: dict, expected: str | None) -> None:
    """Without --formats a budgeted packed job takes the measured default set, and the spec records it (the job
    record and manifest say what ran); the features that work on widths keep the widths (bitplan-default)."""
    budget = {} if "bytes" in flat else {"bits_per_weight": 4.0}
    spec = JobSpec.from_flat(model="x", **budget, **flat)
    assert spec.quantization.format_names == (None if expected is None else PRESETS[expected])
    if expected == "bitplan-mix":
        assert spec.to_dict()["quantization"]["formats"] == "bitplan-mix"
        assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_flat(model="x", uniform_bits=4).quantization.format_names is None


def test_issue16_presets_resolve() -> None:
    assert resolve_formats(None) is None and resolve_formats("bitplan-default") is None
    assert resolve_formats("gguf-all") == tuple(n for n, f in FORMATS.items() if f.family == "ggml")
    assert resolve_formats(" Q4_K , int4-g32,Q4_K") == ("Q4_K", "int4-g32")
    with pytest.raises(ValueError, match="unknown format"):
        resolve_formats("Q4_K,nope")


@pytest.mark.parametrize("quantizer", ["rtn-salience", "gptq"])
def test_issue17_compressed_tensors_target_loads_with_from_pretrained(wide_llama_dir: Path, tmp_path: Path,
                                                                      quantizer: str) -> None:
    """``--target compressed-tensors``: the artifact folder itself loads with transformers' ``from_pretrained``
    (its compressed-tensors integration, default settings) and computes what our loader computes, up to fp16;
    its symmetric grids encoded by round to nearest or by GPTQ."""
    from transformers import AutoModelForCausalLM

    run = run_pipeline(JobSpec.from_flat(model=str(wide_llama_dir), bits_per_weight=6.0, target="compressed-tensors",
                                         quantizer=quantizer, **SMALL), out=tmp_path / "ct")
    assert run.target == "compressed-tensors" and {f["name"] for f in run.files} == {"model.safetensors",
                                                                                     "config.json"}
    chosen = {u["format"] for u in run.units}
    assert chosen <= set(PRESETS["ct-wna16"]) and {"int4", "int8"} & {f.split("-")[0] for f in chosen}
    assert all(u["format"] != "int4-g128-sym" for u in run.units if u["name"].endswith("down_proj"))  # 96 wide
    theirs = AutoModelForCausalLM.from_pretrained(run.artifact).eval()
    ours, _, manifest = load_artifact(Path(run.artifact))  # still our artifact, every file checked
    assert "model.safetensors" in manifest.files
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = theirs(tokens).logits.float(), ours(tokens).logits
    assert torch.allclose(a, b, atol=2e-3 * float(b.abs().max())), float((a - b).abs().max())


def test_issue17_targets_refuse_formats_they_cannot_store() -> None:
    for target, formats in (("gguf", "int4-g32"), ("gguf", "bitplan-default"), ("compressed-tensors", "Q4_0"),
                            ("compressed-tensors", "int4-g32")):
        with pytest.raises(SpecError, match=f"the {target} target stores") as caught:
            JobSpec.from_flat(model="x", bits_per_weight=5.0, target=target, formats=formats)
        assert caught.value.param == "formats"
    assert JobSpec.from_flat(model="x", bits_per_weight=5.0, target="gguf").quantization.format_names == \
        PRESETS["gguf-k"]


def from_pretrained_matches_our_loader(folder: Path) -> None:
    """transformers' own ``from_pretrained`` of the packed folder (the quantizer ``import bitplan`` registers)
    loads every tensor and computes the same logits as ``load_artifact``."""
    from transformers import AutoModelForCausalLM

    import bitplan  # noqa: F401 (registers the quantizer)
    from bitplan.kernels.quant_linear import QuantLinear

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours, _, manifest = load_artifact(folder)
    integer = [u.name for u in manifest.units if u.layout != "ggml-blocks"]
    assert all(isinstance(model.get_submodule(name), QuantLinear) for name in integer)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits.float(), ours(tokens).logits.float())


def test_issue14_from_pretrained_loads_the_packed_folder_with_ggml_units(gguf_run) -> None:
    from_pretrained_matches_our_loader(Path(gguf_run.artifact))  # GGML blocks, decoded once loaded
