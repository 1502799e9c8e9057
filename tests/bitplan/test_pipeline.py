"""The pipeline on a tiny Llama: budgets, artifact contents, loader equality, atomic writes and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitplan.errors import ArtifactError, BitplanError, BudgetError
from bitplan.hashing import sha256_file
from bitplan.job.pipeline import run_pipeline
from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.sources.models import load_model
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec
from bitplan.targets.artifact import MANIFEST, load_artifact

SMALL = {"num_samples": 2, "seq_len": 32, "group_size": 64}


@pytest.fixture(scope="module")
def mixed_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs") / "mixed"
    # plain RTN, not the default rtn-salience: the loader check below rebuilds the weights without calibration data
    return run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=4.0, quantizer="rtn", **SMALL),
                        out=out)


def test_mixed_run_respects_budget_measured_from_files(mixed_run) -> None:
    manifest = json.loads((Path(mixed_run.artifact) / MANIFEST).read_text())
    assert mixed_run.status == "optimal"
    assert mixed_run.kl_divergence is not None and mixed_run.kl_divergence > 0
    assert mixed_run.bits_per_weight <= 4.0
    assert mixed_run.bytes == manifest["achieved"]["bytes"] == mixed_run.predicted_bytes
    assert mixed_run.lower_bound <= mixed_run.objective + 1e-12
    assert {u["bits"] for u in mixed_run.units} <= {2, 3, 4, 8}
    assert len({u["bits"] for u in mixed_run.units}) > 1, "a 4.0 bpw budget should mix bit widths here"
    assert [u["name"] for u in mixed_run.units][0] == "model.layers.0.self_attn.q_proj"


def test_manifest_records_everything(mixed_run) -> None:
    path = Path(mixed_run.artifact)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format_version"] == 5 and manifest["packing"] == "bitstream-int32"
    assert manifest["solver"]["status"] == "optimal"
    assert manifest["sensitivity"]["metric"] == "token_taylor_kl"
    assert len(manifest["calibration"]["sha256"]) == 64
    assert manifest["budget"]["bits_per_weight"] == 4.0
    for name, digest in manifest["files"].items():
        assert sha256_file(path / name) == digest
    assert sha256_file(path / MANIFEST) == mixed_run.manifest_sha256
    assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]


def test_loader_equals_in_memory_quantized_model(mixed_run, tiny_llama_dir: Path) -> None:
    reference = load_model(str(tiny_llama_dir)).model
    bits = {u["name"]: u["bits"] for u in mixed_run.units}
    with torch.no_grad():
        for name, module in find_units(reference).items():
            module.weight.copy_(dequantize_weight(quantize_rtn(module.weight, bits=bits[name], group_size=64)))
    loaded, _, _ = load_artifact(Path(mixed_run.artifact))
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, reference(tokens).logits)


def test_uniform_baseline(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=3, quantizer="rtn", **SMALL),
                          out=tmp_path / "u3")
    assert result.status == "uniform" and {u["bits"] for u in result.units} == {3}
    assert result.objective is None and result.calibration is None  # plain RTN reads no calibration text
    default = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=3, **SMALL), out=tmp_path / "d3")
    assert default.status == "uniform" and default.bytes == result.bytes and default.objective is None
    assert default.calibration is not None  # the default encoder (rtn-salience) weighs by the calibration's inputs


def test_bytes_budget_and_output_error_metric(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), bytes=20_000, metric="output_error", **SMALL),
                          out=tmp_path / "b")
    assert result.bytes <= 20_000 and result.metric == "output_error"


@pytest.mark.parametrize("bpw, message", [
    (1.0, r"below the smallest achievable size.*2\.5000 bits per weight"),
    (9.0, r"above the largest achievable size: .* achievable range is 2\.\d+ to 8\.\d+ bits per weight"),
])
def test_budget_out_of_range_is_rejected_before_heavy_work(tiny_llama_dir: Path, tmp_path: Path, bpw: float,
                                                           message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=bpw, **SMALL), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"bits_per_weight": 4.0, "uniform_bits": 4}, "exactly one of"),
    ({"uniform_bits": 9}, "between 1 and 8"),
    ({"bits_per_weight": 4.0, "metric": "magic"}, "unknown metric 'magic'"),
    ({"bits_per_weight": 4.0, "group_size": 0}, "group size must be between 8 and 4096"),  # one rule (issue 13)
    ({"bits_per_weight": float("nan")}, "positive finite number"),
    ({"bits_per_weight": float("inf")}, "positive finite number"),
    ({"bytes": -5}, "bytes budget must be positive"),
    ({"bits_per_weight": 4.0, "quantizer": "awq"}, "unknown quantizer 'awq'"),
])
def test_bad_config(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(BitplanError, match=message):
        JobSpec.from_flat(model="smollm2-135m", **kwargs)


def test_refuses_to_overwrite_a_foreign_directory(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a bitplan artifact"):
        run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=4, **SMALL), out=out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_rerun_replaces_an_artifact_whole(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=4, **SMALL), out=out)
    second = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=2, **SMALL), out=out)
    assert json.loads((out / MANIFEST).read_text())["units"][0]["bits"] == 2
    assert second.manifest_sha256 == sha256_file(out / MANIFEST)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_tampered_artifact_fails_checksum(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=4, **SMALL), out=out)
    with (out / "quantized.safetensors").open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    with pytest.raises(ArtifactError, match="fails its sha256 check"):
        load_artifact(out)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_artifact(tmp_path)


def test_fused_ties_and_pins(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, tie_fused=True,
                                            pinned=(("model.layers.0.mlp.down_*", 8),), **SMALL), out=tmp_path / "tied")
    bits = {u["name"]: u["bits"] for u in result.units}
    assert bits["model.layers.0.mlp.down_proj"] == 8
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        assert len({bits[prefix + f"self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert bits[prefix + "mlp.gate_proj"] == bits[prefix + "mlp.up_proj"]
    assert result.bits_per_weight <= 3.5


def test_pins_that_do_not_fit_or_match_are_explained(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="smallest achievable budget is"):
        run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=2.6, pinned=(("*", 8),), **SMALL),
                     out=tmp_path / "a")
    with pytest.raises(BitplanError, match="matches no unit"):
        run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, pinned=(("*.nonexistent", 8),),
                                       **SMALL), out=tmp_path / "b")
    with pytest.raises(BitplanError, match="not a candidate width"):
        JobSpec.from_flat(model="x", bits_per_weight=3.5, formats="bitplan-default", pinned=(("*", 5),))
    with pytest.raises(BitplanError, match="no candidate format has 7 bits"):  # the default set: bitplan-mix
        JobSpec.from_flat(model="x", bits_per_weight=3.5, pinned=(("*", 7),))


def test_several_budgets_compute_sensitivity_once(tiny_llama_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import bitplan.job.pipeline as pipeline
    import bitplan.job.sensitivity_pass as sensitivity_pass

    calls = []
    original = sensitivity_pass.compute_sensitivity
    monkeypatch.setattr(sensitivity_pass, "compute_sensitivity", lambda *a, **k: calls.append(1) or original(*a, **k))
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=[2.75, 3.0, 3.5, 4.0], **SMALL)
    results = pipeline.run_budgets(spec, out_dirs=[tmp_path / str(i) for i in range(4)])
    assert len(calls) == 1
    assert [r.bits_per_weight <= b + 1e-9 for r, b in zip(results, [2.75, 3.0, 3.5, 4.0], strict=True)] == [True] * 4


@pytest.mark.parametrize("quantizer", ["gptq", "gptq-salience", "rtn-salience"])
def test_calibrated_quantizers_write_the_same_sizes_and_lower_the_layer_error(tiny_llama_dir: Path, tmp_path: Path,
                                                                              quantizer: str) -> None:
    from bitplan.job.quantize import input_grams
    from bitplan.quantizer.methods import quantize_unit

    result = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=3, quantizer=quantizer, **SMALL),
                          out=tmp_path / quantizer)
    rtn = run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), uniform_bits=3, **SMALL), out=tmp_path / "rtn")
    manifest = json.loads((Path(result.artifact) / MANIFEST).read_text())
    assert result.bytes == rtn.bytes and manifest["quantizer"].startswith(quantizer.split("-")[0])
    assert len(manifest["calibration"]["sha256"]) == 64
    loaded_model = load_model(str(tiny_llama_dir))
    units = find_units(loaded_model.model)
    from bitplan.sources.calibration import build_calibration_set

    tokens = build_calibration_set(loaded_model.tokenizer, text_file=None, num_samples=2, seq_len=32, seed=0).tokens
    grams = input_grams(loaded_model, units, tokens, None, None)
    artifact, _, _ = load_artifact(Path(result.artifact))
    name = "model.layers.0.mlp.down_proj"
    ours = artifact.get_submodule(name).dequantized_weight()
    expected = dequantize_weight(quantize_unit(units[name].weight, method=quantizer, bits=3, group_size=64,
                                               gram=grams[name]))
    assert torch.equal(ours, expected)  # the artifact holds exactly what the quantizer gives on the calibration set

    def output_error(weight: torch.Tensor) -> float:
        delta = weight - units[name].weight.detach()
        return float(torch.trace(delta @ grams[name] @ delta.T))

    assert output_error(expected) <= output_error(dequantize_weight(quantize_rtn(units[name].weight, bits=3,
                                                                                  group_size=64))) * 1.0001


def test_mixed_groups_inside_layers_round_trip_and_keep_the_size(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from bitplan.targets.exports.common import read_artifact_units
    from tests.bitplan.test_formats_pipeline import from_pretrained_matches_our_loader
    from tests.conftest import _word_tokenizer, make_tiny_llama

    model = make_tiny_llama()
    with torch.no_grad():  # one column group of each down projection carries 8x larger weights: worth more bits
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :32] *= 8
    folder = tmp_path / "skewed"
    model.save_pretrained(folder, safe_serialization=True)
    _word_tokenizer(512).save_pretrained(folder)
    small = {**SMALL, "group_size": 32}
    uniform = run_pipeline(JobSpec.from_flat(model=str(folder), uniform_bits=3, **small), out=tmp_path / "u")
    mixed = run_pipeline(JobSpec.from_flat(model=str(folder), uniform_bits=3, mix_groups=True, **small),
                         out=tmp_path / "m")
    assert mixed.bytes == mixed.predicted_bytes <= uniform.bytes
    mixed_units = [u for u in mixed.units if "group_bits" in u]
    assert mixed_units, "some layer should trade widths between its column groups"
    for unit in mixed_units:
        assert set(unit["group_bits"]) <= {2, 3, 4} and len(set(unit["group_bits"])) > 1
    manifest = json.loads((Path(mixed.artifact) / MANIFEST).read_text())
    layouts = {u["name"]: u.get("layout") for u in manifest["units"]}
    assert {layouts[u["name"]] for u in mixed_units} == {"segments-by-width"}
    from_pretrained_matches_our_loader(Path(mixed.artifact))  # issue 14: transformers loads it too
    # the loader's weights are exactly the quantizer's, through the segment packing and its inverse
    model, _, _ = load_artifact(Path(mixed.artifact))
    _, units, _ = read_artifact_units(Path(mixed.artifact))
    for unit in mixed_units:
        layer = model.get_submodule(unit["name"])
        exported = units[unit["name"]]
        assert torch.equal(layer.dequantized_weight(), dequantize_weight(exported))
        for g, bits in enumerate(unit["group_bits"]):
            assert int(exported.codes[:, g * 32 : (g + 1) * 32].max()) < 1 << bits


def test_issue15_a_model_with_zero_layers_is_refused_as_bad_input(tmp_path: Path) -> None:
    """Fault 10's "zero layers": a config with no transformer blocks loads, but has nothing to quantize; that is
    the caller's model, not an internal error (the service reports its code, not retryable)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _word_tokenizer

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=0,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(tmp_path / "empty", safe_serialization=True)
    _word_tokenizer(512).save_pretrained(tmp_path / "empty")
    with pytest.raises(BitplanError, match="no linear layers inside its transformer blocks") as caught:
        run_pipeline(JobSpec.from_flat(model=str(tmp_path / "empty"), bits_per_weight=4.0, **SMALL),
                     out=tmp_path / "out")
    assert caught.value.code == "invalid_model" and caught.value.status == 422
    assert not (tmp_path / "out").exists()


def test_salience_jobs_are_told_the_salience_encoders_error_not_rtns(tiny_llama_dir: Path) -> None:
    """A job without formats under ``--quantizer rtn-salience``: its sensitivity is that of the weight error the
    quantize step will write (the salience-calibrated grid on the quantize step's own Grams), not plain RTN's."""
    from bitplan.job.pipeline import measure_sensitivity
    from bitplan.job.quantize import input_grams
    from bitplan.quantizer.methods import quantize_unit
    from bitplan.sensitivity import Metric, SensitivityRequest, compute_sensitivity
    from bitplan.sources.calibration import build_calibration_set
    from bitplan.sources.models import causal_lm_loss, causal_lm_sampled_loss
    from bitplan.sources.units import find_block_stack

    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, quantizer="rtn-salience", **SMALL)
    ours = measure_sensitivity(spec, use_cache=False)
    plain = measure_sensitivity(JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, quantizer="rtn",
                                                  **SMALL), use_cache=False)
    loaded = load_model(str(tiny_llama_dir))
    units = find_units(loaded.model)
    tokens = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=2, seq_len=32, seed=0).tokens
    grams = input_grams(loaded, units, tokens, None, None)

    def written_error(name: str, bits: object) -> torch.Tensor:  # what the quantize step stores, minus the weight
        weight = units[name].weight.detach().float()
        return dequantize_weight(quantize_unit(weight, method="rtn-salience", bits=int(bits), group_size=64,
                                               gram=grams[name])) - weight

    request = SensitivityRequest(Metric.TOKEN_TAYLOR_KL, bits_options=spec.widths, group_size=64,
                                 options={name: list(spec.widths) for name in units}, error_of=written_error)
    reference = compute_sensitivity(loaded.model, units, list(torch.split(tokens, 1)), request,
                                    loss_fn=causal_lm_loss, curvature_loss_fn=causal_lm_sampled_loss,
                                    blocks=find_block_stack(loaded.model))
    by_name = {u.name: u.delta_loss for u in reference.units}
    differs = False
    for unit, rtn_unit in zip(ours.units, plain.units, strict=True):
        assert unit.delta_loss.keys() == by_name[unit.name].keys()
        for bits, value in unit.delta_loss.items():
            assert value == pytest.approx(by_name[unit.name][bits], rel=1e-4, abs=1e-9), (unit.name, bits)
            differs |= abs(value - rtn_unit.delta_loss[bits]) > 1e-6 * max(abs(value), 1e-9)
    assert differs  # plain RTN's error is another error: the job is no longer told that one


def test_rtn_salience_widths_reuse_the_measured_input_energy(tiny_llama_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``rtn-salience`` a job's widths are encoded from the input energy the sensitivity pass measured, with
    no second calibration pass, and give what the reference path (Gram matrices collected block by block, their
    diagonals as salience) gives."""
    from bitplan.job import quantize as quantize_module
    from bitplan.sensitivity.importance import input_energy
    from bitplan.sources.calibration import build_calibration_set

    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, quantizer="rtn-salience", **SMALL)
    loaded = load_model(str(tiny_llama_dir))
    units = find_units(loaded.model)
    tokens = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=4, seq_len=32, seed=0).tokens
    energy = input_energy(loaded.model, units, list(torch.split(tokens, 1)))
    widths = (2, 3, 4, 8)
    choice = {name: widths[index % len(widths)] for index, name in enumerate(units)}
    passes: list[int] = []
    collect = quantize_module.grams_by_block

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(1)
        yield from collect(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "grams_by_block", counted)
    (fast,) = quantize_module.quantize_plans(spec, loaded, units, [choice], tokens, importance=energy)
    assert passes == []
    (reference,) = quantize_module.quantize_plans(spec, loaded, units, [choice], tokens)
    assert passes == [1]
    for name in units:
        assert fast[name].bits == reference[name].bits == choice[name]
        assert torch.equal(dequantize_weight(fast[name]), dequantize_weight(reference[name])), name


def test_issue45_a_second_budget_on_a_cached_model_runs_no_calibration_forward(
        tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second job on the same model and calibration takes its sensitivity and its input energy (the encoders'
    importance) from the cache: the calibration statistics' forward pass does not run again, and the artifact is
    the one a job without the cache makes."""
    import bitplan.job.pipeline as pipeline

    def spec(bpw: float) -> JobSpec:
        return JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=bpw, num_samples=2, seq_len=32)

    first = pipeline.run_pipeline(spec(4.0), out=tmp_path / "first")
    assert first.calibration is not None and first.calibration["sensitivity_cache"] == "miss"

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the calibration forward ran again")

    monkeypatch.setattr(pipeline, "input_energy", refuse)
    second = pipeline.run_pipeline(spec(5.0), out=tmp_path / "second")
    assert second.calibration is not None and second.calibration["sensitivity_cache"] == "hit"
    monkeypatch.undo()
    uncached = pipeline.run_pipeline(spec(5.0), out=tmp_path / "uncached", use_cache=False)
    assert second.units == uncached.units and second.bytes == uncached.bytes
    weights = {f["name"]: f["sha256"] for f in second.files or [] if f["name"].endswith(".safetensors")}
    assert weights and weights == {f["name"]: f["sha256"] for f in uncached.files or []
                                   if f["name"].endswith(".safetensors")}
