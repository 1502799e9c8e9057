"""Mixture-of-experts models (issue 43): experts found as units whether fused (transformers 5) or Linear, their
statistics per expert equal to a plain loop over the experts, the GGUF target's 3-D expert stacks loaded and run by
llama.cpp, the routing and bytes by kind in the report, unreached experts pinned."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from bitplan.sources.moe import (
    LinearExperts,
    RoutingReport,
    expert_stacks,
    expert_unit,
    routed_tokens,
    unfuse_experts,
    unreached_pins,
)
from bitplan.sources.units import find_units

VOCAB = 1000
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256}
CONFIGS = {
    "qwen3moe": ("Qwen3MoeConfig", {"moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
                                    "head_dim": 16, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2}),
    "gpt-oss": ("GptOssConfig", {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
                                 "head_dim": 16, "layer_types": ["full_attention"] * 2}),
}


def tiny_moe(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random MoE causal LM from transformers' own config class, with random biases where it has them."""
    config_class, extra = CONFIGS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**COMMON, **extra, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)
    return model


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_issue43_unfused_experts_compute_the_same_function_and_are_units(kind: str) -> None:
    fused = tiny_moe(kind)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = fused(tokens).logits
    model = copy.deepcopy(fused)
    assert find_units(fused) and not any(expert_unit(n) for n in find_units(fused))  # fused: invisible as units
    assert unfuse_experts(model) == 2
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # the same loop (gpt-oss's transposed weights
    # and biases round once differently)
    units = find_units(model)
    experts = [n for n in units if expert_unit(n) is not None]
    assert len(experts) == 2 * 8 * 3  # every layer's every expert's three projections
    assert {expert_unit(n).projection for n in experts} == {"gate_proj", "up_proj", "down_proj"}
    assert not [n for n in units if n.endswith((".gate", ".router"))]  # the router stays in float
    assert all(isinstance(s, LinearExperts) for s in expert_stacks(model).values())


def _reference_expert_energy(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
    """Plain torch, from the fused model: each layer's MoE input, its router's top-k, and for each expert the sum
    over the tokens routed to it of its gate/up input squared, and of its down input (act(gate) * up) squared."""
    inputs: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    def keep(index: int):
        return lambda module, args, output: inputs.__setitem__(index, args[0].reshape(-1, args[0].shape[-1]))

    handles = [layer.mlp.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    reference = {}
    for i, layer in enumerate(layers):
        x = inputs[i]
        _, _, chosen = layer.mlp.gate(x)
        fused = layer.mlp.experts
        for expert in range(fused.num_experts):
            rows = (chosen == expert).any(dim=-1)
            xe = x[rows]
            gate, up = (xe @ fused.gate_up_proj[expert].T).chunk(2, dim=-1)
            hidden = fused.act_fn(gate) * up
            stack = f"model.layers.{i}.mlp.experts.{expert}"
            reference[f"{stack}.gate_proj"] = (int(rows.sum()), xe.double().pow(2).sum(0))
            reference[f"{stack}.down_proj"] = (int(rows.sum()), hidden.double().pow(2).sum(0))
    return reference


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral", "olmoe"])
def test_issue43_per_expert_statistics_equal_a_plain_loop_over_the_experts(kind: str) -> None:
    from bitplan.sensitivity.activations import collect_unit_statistics
    from bitplan.sensitivity.importance import input_energy

    fused = tiny_moe(kind)
    tokens = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(2))
    reference = _reference_expert_energy(fused, tokens)
    model = copy.deepcopy(fused)
    unfuse_experts(model)
    units = find_units(model)
    batches = list(torch.split(tokens, 1))
    energy = input_energy(model, units, batches)
    stats = collect_unit_statistics(model, units, batches)
    with routed_tokens(model) as counts, torch.no_grad():
        for batch in batches:
            model(batch)
    routing = RoutingReport.of(counts)
    for name, (count, sums) in reference.items():
        assert stats[name].tokens == count, name
        torch.testing.assert_close(energy[name].double(), sums, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.diagonal(stats[name].gram).double(), sums, rtol=1e-4, atol=1e-5)
        e = expert_unit(name)
        assert routing.tokens[e.stack][e.expert] == count
    per_layer = [sum(v) for v in routing.tokens.values()]
    assert per_layer == [tokens.numel() * 2] * 2  # top-2: every token counted twice per layer


def test_issue43_unreached_experts_are_reported_and_pinned_where_experts_stand_apart() -> None:
    counts = {"m.layers.0.mlp.experts": torch.tensor([5, 0, 3]), "m.layers.1.mlp.experts": torch.tensor([1, 1, 6])}
    routing = RoutingReport.of(counts)
    assert routing.unreached == ["m.layers.0.mlp.experts.1"]
    units = [f"m.layers.{i}.mlp.experts.{e}.{p}" for i in (0, 1) for e in range(3)
             for p in ("gate_proj", "up_proj", "down_proj")] + ["m.layers.0.self_attn.q_proj"]
    pins = unreached_pins(routing, units, (2, 3, 4, 8), stacked=False)
    assert pins == tuple((f"m.layers.0.mlp.experts.1.{p}", 4) for p in ("gate_proj", "up_proj", "down_proj"))
    assert unreached_pins(routing, units, (2, 3, 4, 8), stacked=True) == ()  # GGUF: the stack's type
    assert unreached_pins(routing, units, (2, 3), stacked=False)[0][1] == 3  # no 4: the widest below
    assert routing.to_json()["min_tokens"] == 0


# --- end to end: a tiny Qwen3-MoE folder through the job, to GGUF (llama.cpp) and packed -------------------------

def moe_folder(path: Path, tokenizer: Path, *, experts: int = 8) -> Path:
    """A Qwen3-MoE folder (bf16, widths of 256 so every GGML type is legal) with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=49152, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=512, moe_intermediate_size=256, num_experts=experts, num_experts_per_tok=2,
        norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=1024, rms_norm_eps=1e-6)
    model = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    for file in tokenizer.iterdir():
        shutil.copy(file, path / file.name)
    return path


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bitplan.sources.models import resolve_reference

    _, gguf_path = resolve_reference("smollm2-135m")
    tokenizer = tmp_path_factory.mktemp("tokenizer")
    transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tokenizer)
    return moe_folder(tmp_path_factory.mktemp("qwen3-moe"), tokenizer)


def _job(model: Path, target: str):
    from bitplan.spec import JobSpec

    return JobSpec.from_flat(model=str(model), bits_per_weight=4.0, target=target, num_samples=4, seq_len=64,
                             quality_windows=1, quality_seq_len=64, kl_windows=1)


def _llama(path: Path):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=256, verbose=False, logits_all=True)


@pytest.mark.slow  # about 2 minutes each here; in .ci/run's slow subset
def test_issue43_gguf_target_writes_expert_stacks_that_llama_cpp_runs(qwen3_moe_dir: Path, tmp_path: Path) -> None:
    import gguf

    from bitplan.job.pipeline import run_budgets
    from bitplan.targets.artifact import load_artifact
    from bitplan.targets.exports.gguf_file import read_imatrix

    [result] = run_budgets(_job(qwen3_moe_dir, "gguf"), out_dirs=[tmp_path / "out"], use_cache=False)
    out = tmp_path / "out"
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}
    for layer in range(2):
        for projection in ("gate", "up", "down"):
            stack = tensors[f"blk.{layer}.ffn_{projection}_exps.weight"]
            assert len(stack.shape) == 3 and int(stack.shape[-1]) == 8  # (experts, rows, columns), one type
        assert tensors[f"blk.{layer}.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    by_unit = {u["name"]: u["format"] for u in result.units}
    for layer in range(2):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert len({by_unit[f"model.layers.{layer}.mlp.experts.{e}.{projection}"] for e in range(8)}) == 1
    # the report: every expert byte counted, the routing, no silent float
    kinds = result.bytes_by_kind
    block_bytes = sum(int(t.n_bytes) for n, t in tensors.items() if n.startswith("blk.") and t.tensor_type not in (
        gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16))
    assert block_bytes == result.bytes <= result.budget["bytes"]  # the file's quantized tensors, within the budget
    assert kinds["experts"] > 0 and kinds["router"] > 0 and kinds["attention"] > 0
    assert kinds["experts"] == sum(int(t.n_bytes) for n, t in tensors.items() if "_exps" in n)
    assert result.experts["layers"] == 2 and result.experts["experts"] == 16
    assert [sum(v) for v in result.experts["tokens_per_expert"].values()] == [4 * 64 * 2] * 2
    # the importance matrix: one count per expert, the tokens routed to it
    imatrix = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out / "model.imatrix.gguf").tensors}
    counts = imatrix["blk.1.ffn_down_exps.weight.counts"].ravel().tolist()
    assert counts == result.experts["tokens_per_expert"]["model.layers.1.mlp.experts"]
    assert read_imatrix(out / "model.imatrix.gguf")["blk.1.ffn_down_exps.weight"].shape == (8, 256)
    # llama.cpp runs the file as our loader runs the artifact, and decodes
    runtime = _llama(out / "model.gguf")
    ids = runtime.tokenize(b"The capital of France is a city of")
    runtime.eval(ids)
    theirs = torch.tensor(np.array(runtime.scores[: len(ids)]))
    ours, _, _ = load_artifact(out)
    with torch.no_grad():
        expected = ours(torch.tensor([ids])).logits[0]
    # llama.cpp rounds activations to 8 bits, which can flip a near-tie of this random router at a position: most
    # positions agree within 5 % of the largest logit, and the predictions agree
    per_position = (theirs - expected).abs().amax(-1)
    assert float(per_position.median()) < 0.05 * float(expected.abs().max())
    assert (theirs.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    runtime.reset()
    completion = runtime.create_completion("The capital of France is", max_tokens=6, temperature=0)
    assert completion["usage"]["completion_tokens"] >= 1


@pytest.mark.slow  # about 2 minutes each here; in .ci/run's slow subset
def test_issue43_streamed_gguf_of_a_moe_folder_matches_the_whole_model_file(qwen3_moe_dir: Path,
                                                                           tmp_path: Path) -> None:
    import gguf

    from bitplan.job.streamed_job import run_streamed_gguf

    spec = _job(qwen3_moe_dir, "gguf")
    [result] = run_streamed_gguf(spec, out_dirs=[tmp_path / "streamed"])
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "streamed" / "model.gguf").tensors}
    assert len(tensors["blk.0.ffn_up_exps.weight"].shape) == 3
    assert result.experts is not None and [sum(v) for v in result.experts["tokens_per_expert"].values()] == [512] * 2
    assert result.bytes_by_kind["experts"] == sum(int(t.n_bytes) for n, t in tensors.items() if "_exps" in n)
    runtime = _llama(tmp_path / "streamed" / "model.gguf")
    completion = runtime.create_completion("The capital of France is", max_tokens=6, temperature=0)
    assert completion["usage"]["completion_tokens"] >= 1


@pytest.mark.slow  # about 2 minutes each here; in .ci/run's slow subset
def test_issue43_packed_target_holds_experts_apart_pins_unreached_and_loads(qwen3_moe_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import bitplan.job.pipeline as pipeline
    from bitplan.job.moe_job import routing_of_windows
    from bitplan.sources.models import load_model
    from bitplan.targets.artifact import load_artifact

    def one_expert_unreached(model: torch.nn.Module, tokens: torch.Tensor) -> RoutingReport:
        report = routing_of_windows(model, tokens)
        tokens_of = {k: list(v) for k, v in report.tokens.items()}
        tokens_of["model.layers.1.mlp.experts"][5] = 0  # as if no calibration token had reached expert 5
        return RoutingReport.of({k: torch.tensor(v) for k, v in tokens_of.items()})

    monkeypatch.setattr(pipeline, "routing_of_windows", one_expert_unreached)
    [result] = run_budgets_packed(qwen3_moe_dir, tmp_path / "packed")
    bits = {u["name"]: u["bits"] for u in result.units}
    assert all(bits[f"model.layers.1.mlp.experts.5.{p}"] == 4 for p in ("gate_proj", "up_proj", "down_proj"))
    assert any("saw no calibration token" in w for w in result.warnings)
    assert len({bits[f"model.layers.0.mlp.experts.{e}.down_proj"] for e in range(8)} |
               {bits[f"model.layers.0.mlp.experts.{e}.gate_proj"] for e in range(8)}) >= 1
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert sum(u["name"].count(".experts.") for u in manifest["units"]) == 48
    assert result.bytes_by_kind["experts"] == sum(u["bytes"] for u in manifest["units"] if ".experts." in u["name"])
    model, tokenizer, _ = load_artifact(tmp_path / "packed")
    source = load_model(str(qwen3_moe_dir)).model
    ids = tokenizer("The capital of France is a city of", return_tensors="pt").input_ids
    with torch.no_grad():
        p = torch.log_softmax(source(ids).logits, -1)
        q = torch.log_softmax(model(ids).logits, -1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 0.05
    # transformers' own from_pretrained (bitplan imported: its quantizer registered) runs the same experts
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.experts, LinearExperts)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow  # about a minute each here
@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_issue43_mixtral_and_olmoe_gguf_run_in_llama_cpp_as_our_loader(kind: str, qwen3_moe_dir: Path,
                                                                      tmp_path: Path) -> None:
    from bitplan.job.pipeline import run_budgets
    from bitplan.spec import JobSpec
    from bitplan.targets.artifact import load_artifact

    torch.manual_seed(0)
    common = {"vocab_size": 49152, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 256, "num_experts_per_tok": 2, "tie_word_embeddings": False,
              "max_position_embeddings": 1024, "rms_norm_eps": 1e-6}
    config = (transformers.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=8) if kind == "mixtral"
              else transformers.OlmoeConfig(**common, num_key_value_heads=4, num_experts=8))  # llama.cpp: no GQA
    folder = tmp_path / kind
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    for file in qwen3_moe_dir.glob("tokenizer*"):
        shutil.copy(file, folder / file.name)
    spec = JobSpec.from_flat(model=str(folder), bits_per_weight=4.5, target="gguf", num_samples=2, seq_len=64,
                             quality_windows=0, kl_windows=0)
    [result] = run_budgets(spec, out_dirs=[tmp_path / "out"], use_cache=False)
    assert result.bytes_by_kind["experts"] > 0 and result.experts["experts"] == 16
    runtime = _llama(tmp_path / "out" / "model.gguf")
    ids = runtime.tokenize(b"The capital of France is a city of")
    runtime.eval(ids)
    theirs = torch.tensor(np.array(runtime.scores[: len(ids)]))
    ours, _, _ = load_artifact(tmp_path / "out")
    with torch.no_grad():
        expected = ours(torch.tensor([ids])).logits[0]
    per_position = (theirs - expected).abs().amax(-1)
    assert float(per_position.median()) < 0.05 * float(expected.abs().max())
    assert (theirs.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


def run_budgets_packed(model: Path, out: Path):
    from bitplan.job.pipeline import run_budgets

    return run_budgets(_job(model, "bitplan"), out_dirs=[out], use_cache=False)


def test_issue43_linear_experts_are_found_and_tied_as_their_target_stores_them() -> None:
    """Experts already held as nn.Linear (Mixtral's older ``block_sparse_moe.experts.N.w1/w2/w3`` and our own
    ``experts.N.gate_proj``) are expert units, tied per projection for GGUF, per layer or (compressed-tensors,
    which transformers reads with one experts scheme) all together."""
    from bitplan.job.planning import ROUTED_EXPERTS, stacks_experts, unit_tie
    from bitplan.spec import JobSpec

    old = "model.layers.2.block_sparse_moe.experts.5.w3"
    assert expert_unit(old).projection == "up_proj" and expert_unit(old).expert == 5
    model = tiny_moe("mixtral")
    unfuse_experts(model)
    names = [n for n in find_units(model) if expert_unit(n) is not None]
    by_projection = {unit_tie(n, tie_fused=False, tie_experts="projection") for n in names}
    by_layer = {unit_tie(n, tie_fused=False, tie_experts="layer") for n in names}
    assert by_projection == {f"model.layers.{i}.mlp.experts.*.{p}" for i in (0, 1)
                             for p in ("gate_proj", "up_proj", "down_proj")}
    assert by_layer == {f"model.layers.{i}.mlp.experts.*" for i in (0, 1)}
    spec = JobSpec.from_flat(model="smollm2-135m", bits_per_weight=6.0, target="compressed-tensors")
    assert stacks_experts(spec) == "model"
    assert {unit_tie(n, tie_fused=False, tie_experts="model") for n in names} == {ROUTED_EXPERTS}
    assert {unit_tie(n, tie_fused=False, tie_experts=None) for n in names} == {None}  # packed: each apart
    assert unit_tie("model.layers.0.self_attn.q_proj", tie_fused=False, tie_experts="projection") is None
