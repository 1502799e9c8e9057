"""Mixture-of-experts models to compressed-tensors (issue 43): transformers' own ``from_pretrained`` loads the
folder into its fused experts with our decoded weights (Qwen3-MoE, Mixtral with its ``block_sparse_moe``/``w1``
names, OLMoE), every routed expert in one format; a MoE model transformers cannot read back per expert (gpt-oss)
is refused before any heavy work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from bitplan.errors import ModelReferenceError
from tests.moe.test_moe import CONFIGS

pytest.importorskip("compressed_tensors", reason="compressed-tensors is installed by pip install '.[test]'")

# transformers' own configs, as tests/moe/test_moe.py builds them, at widths of 256 (every group size legal)
WIDER = {"moe_intermediate_size": 256, "intermediate_size": 256, "head_dim": 64}
KINDS = {kind: (config_class, {key: WIDER.get(key, value) for key, value in extra.items()})
         for kind, (config_class, extra) in CONFIGS.items()}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bitplan.sources.models import resolve_reference

    _, gguf = resolve_reference("smollm2-135m")
    folder = tmp_path_factory.mktemp("tokenizer")
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def moe_source(kind: str, folder: Path, tokenizer: Path) -> Path:
    """A random bf16 folder of ``kind`` as transformers saves it (Mixtral's files in its old names), widths of
    256 so every compressed-tensors group size is legal, with SmolLM2's tokenizer."""
    config_class, extra = KINDS[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=49152, hidden_size=256, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=1024, tie_word_embeddings=False, **extra)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval().save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


def _spec(model: Path):
    from bitplan.spec import JobSpec

    return JobSpec.from_flat(model=str(model), bits_per_weight=6.0, target="compressed-tensors", num_samples=2,
                             seq_len=64, quality_windows=1, quality_seq_len=64, kl_windows=1)


@pytest.mark.slow  # about 40 s each here; in .ci/run's slow subset
@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral", "olmoe"])
def test_issue43_compressed_tensors_moe_loads_in_transformers_with_our_decoded_experts(
        kind: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    from bitplan.job.pipeline import run_budgets
    from bitplan.targets.artifact import load_artifact

    source = moe_source(kind, tmp_path / "src", tokenizer_dir)
    out = tmp_path / "ct"
    [result] = run_budgets(_spec(source), out_dirs=[out], use_cache=False)
    assert result.bits_per_weight <= 6.0 and result.bytes <= result.budget["bytes"]  # within the budget
    experts = {u["format"] for u in result.units if ".experts." in u["name"]}
    assert len(experts) == 1  # transformers reads every routed expert with one config group
    assert result.bytes_by_kind["experts"] > 0 and any("compressed-tensors" in w for w in result.warnings)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    if kind == "mixtral":  # as the model's own checkpoints name them, which transformers converts
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight_packed" in stored
        assert not any(".mlp." in k for k in stored)
    else:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight_packed" in stored

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, tokenizer, _ = load_artifact(out)
    mlp = loaded.model.layers[1].mlp
    fused = mlp.experts.gate_up_proj if hasattr(mlp, "experts") else None
    assert fused is not None and fused.shape == (8, 512, 256)
    for expert in (0, 5):  # transformers' merged experts are ours, rounded to fp16 once (its decompression)
        gate, up, down = (_decoded(ours, f"model.layers.1.mlp.experts.{expert}.{p}")
                          for p in ("gate_proj", "up_proj", "down_proj"))
        assert torch.equal(fused[expert].float(), torch.cat([gate, up]).half().float())
        assert torch.equal(mlp.experts.down_proj[expert].float(), down.half().float())
    ids = tokenizer("The capital of France is a city of", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs, mine = loaded(ids).logits, ours(ids).logits
    torch.testing.assert_close(theirs, mine, rtol=0, atol=2e-3)


def _decoded(model: torch.nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).dequantized_weight().float()


def test_issue43_a_moe_model_transformers_cannot_read_back_per_expert_is_refused_for_compressed_tensors(
        tokenizer_dir: Path, tmp_path: Path) -> None:
    from bitplan.job.pipeline import run_budgets

    source = moe_source("gpt-oss", tmp_path / "src", tokenizer_dir)
    with pytest.raises(ModelReferenceError, match=re.escape("'gpt_oss'")) as refused:
        run_budgets(_spec(source), out_dirs=[tmp_path / "ct"], use_cache=False)
    assert refused.value.param == "target" and "--target gguf" in str(refused.value)
    assert not (tmp_path / "ct").exists()
