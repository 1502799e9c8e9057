"""The streamed token pass (sensitivity.streamed) against the whole-model pass (token_fisher), and the lazy source
and block stream it runs on, on tiny models built from transformers' own configs."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch

from bitplan.sensitivity.request import Metric, SensitivityRequest
from bitplan.sensitivity.streamed import streamed_token_fisher
from bitplan.sensitivity.token_fisher import token_fisher
from bitplan.sources import lazy as lazy_module
from bitplan.sources import open_lazy
from bitplan.sources.models import (
    causal_lm_loss,
    causal_lm_sampled_loss,
    load_model,
    sampled_loss_of_logits,
    text_loss_of_logits,
)
from bitplan.sources.stream import Boundaries, DecoderStream, resident_model
from bitplan.sources.units import find_units

transformers = pytest.importorskip("transformers")


def tiny_causal_lm(kind: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif kind == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention",
                                                            "sliding_attention"],
                                               final_logit_softcapping=30.0)
    else:
        raise ValueError(kind)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # norms away from 1, so folding mistakes would show
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def windows(count: int = 4, seq_len: int = 12, vocab: int = 96) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return list(torch.randint(0, vocab, (count, seq_len), generator=generator).split(1))


def assert_terms_close(streamed, whole, rel: float = 1e-4) -> None:  # noqa: ANN001
    for field in ("second_order", "first_order", "first_order_std_error"):
        ours, theirs = getattr(streamed, field), getattr(whole, field)
        assert ours.keys() == theirs.keys()
        for name in ours:
            for key, value in theirs[name].items():
                if math.isinf(value):
                    assert math.isinf(ours[name][key])
                    continue
                scale = max(abs(v) for v in theirs[name].values() if not math.isinf(v)) or 1.0
                assert abs(ours[name][key] - value) <= rel * scale, (field, name, key, ours[name][key], value)
    for name, value in whole.energy.items():
        assert streamed.energy[name] == pytest.approx(value, rel=rel)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_stream_logits_equal_whole_model(kind: str) -> None:
    model = tiny_causal_lm(kind)
    stream = DecoderStream(resident_model(model))
    tokens = windows(1)[0]
    hidden = stream.embed(tokens)
    for index in range(stream.num_blocks):
        with stream.block(index) as run, torch.no_grad():
            hidden = run(hidden)
    with stream.head() as head, torch.no_grad():
        logits = head(hidden)
        expected = model(tokens).logits.float()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("cap", [1 << 30, 0])
def test_streamed_token_taylor_kl_equals_whole_model_backward(kind: str, cap: int) -> None:
    """token_taylor_kl's two passes (text slope, model-drawn curvature every 2nd window), float32 products: the
    streamed terms equal the whole model's, whether the boundaries stay in memory or spill to files (cap 0)."""
    model = tiny_causal_lm(kind)
    units = find_units(model)
    batches = windows(4)
    request = SensitivityRequest(Metric.TOKEN_TAYLOR_KL, bits_options=(2, 4), group_size=32, precision="float32",
                                 curvature_stride=2)
    whole = token_fisher(model, units, batches, request, loss_fn=causal_lm_loss,
                         curvature_loss_fn=causal_lm_sampled_loss)
    with Boundaries(cap) as boundaries:
        streamed = streamed_token_fisher(DecoderStream(resident_model(model)), units, batches, boundaries, request,
                                         loss=text_loss_of_logits, curvature_loss=sampled_loss_of_logits)
        assert (boundaries.spilled > 0) == (cap == 0)
    assert_terms_close(streamed, whole)


def test_streamed_single_loss_and_chunks_equal_whole_model() -> None:
    """One loss feeding both terms (token_taylor), units split into several error chunks per block."""
    model = tiny_causal_lm("qwen2")
    units = find_units(model)
    batches = windows(3)
    request = SensitivityRequest(Metric.TOKEN_TAYLOR, bits_options=(3,), group_size=32, precision="float32")
    whole = token_fisher(model, units, batches, request, loss_fn=causal_lm_loss)
    with Boundaries(1 << 30) as boundaries:
        streamed = streamed_token_fisher(DecoderStream(resident_model(model)), units, batches, boundaries,
                                         dataclasses.replace(request, max_error_bytes=64 * 128 * 4),
                                         loss=text_loss_of_logits)
    assert_terms_close(streamed, whole)


def test_lazy_bf16_folder_streams_without_materializing_the_model(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 safetensors folder opens with every parameter on meta; streaming its blocks (read from the shards
    as stored, computed in float32) gives the whole float32 model's terms; no block stays materialized."""
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(), eos_token="<eos>")
    tokenizer.save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    lazy = open_lazy(str(tmp_path))
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    assert lazy.stored_bytes() == sum(p.numel() * 2 for p in model.parameters())
    units = find_units(lazy.model)
    batches = windows(2)
    error_of = functools.partial(_rtn_error, units)
    trims = []
    monkeypatch.setattr(lazy_module, "_LIBC", type("Libc", (), {"malloc_trim": staticmethod(trims.append)}))
    with Boundaries(1 << 30) as boundaries:
        request = SensitivityRequest(Metric.TOKEN_TAYLOR, group_size=32, options={n: [3] for n in units},
                                     error_of=error_of, precision="float32")
        streamed = streamed_token_fisher(DecoderStream(lazy), units, batches, boundaries, request,
                                         loss=text_loss_of_logits)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())
    assert trims and set(trims) == {0}  # each released block's memory handed back to the system (glibc)
    loaded = load_model(str(tmp_path)).model  # the whole model in float32, the reference
    whole = token_fisher(loaded, find_units(loaded), batches,
                         dataclasses.replace(request, error_of=functools.partial(_rtn_error, find_units(loaded))),
                         loss_fn=causal_lm_loss)
    assert_terms_close(streamed, whole)


def _rtn_error(units: dict, name: str, bits: int) -> torch.Tensor:  # noqa: ANN001
    from bitplan.quantizer.rtn import quantization_error

    return quantization_error(units[name].weight.float(), bits=int(bits), group_size=32)


def _word_tokenizer():  # noqa: ANN202
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(95)} | {"<eos>": 95}
    return Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))


def test_streamed_input_energy_equals_whole_model() -> None:
    from bitplan.sensitivity.importance import input_energy
    from bitplan.sources.stream import stream_input_energy

    model = tiny_causal_lm("gemma3")
    units = find_units(model)
    batches = windows(3)
    whole = input_energy(model, units, batches)
    with Boundaries(0) as boundaries:
        streamed = stream_input_energy(DecoderStream(resident_model(model)), units, batches, boundaries)
    for name in units:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-5, atol=1e-6)
