"""Shared fixtures: tiny models built from a config in the test, saved as Hugging Face style folders."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (read when they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every llama.cpp model the tests load (many call llama_cpp.Llama directly) loads as bitplan's own code loads it:
# without llama.cpp's extra CPU buffers, whose repacked kernels crash llama-cpp-python built on AVX512/AMX CPUs.
from bitplan.report.llama_runtime import plain_cpu_buffers  # noqa: E402

plain_cpu_buffers()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext2" / "wiki.test.raw"


def _word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over the built-in calibration text (no files from outside)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bitplan.sources.calibration import builtin_text

    words = Counter(re.findall(r"\w+|[^\w\s]", builtin_text()))
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for word, _ in words.most_common(vocab_size - len(vocab)):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


def make_tiny_llama(seed: int = 0, vocab_size: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 64, intermediate 96: a ragged last group at group size 64) as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    _word_tokenizer(512).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not WIKITEXT.is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT}: ../shared/data is present only in CI and on dev machines")
    return WIKITEXT


@pytest.fixture(autouse=True)
def _own_sensitivity_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets an empty sensitivity cache (and never touches the user's)."""
    monkeypatch.setenv("BITPLAN_CACHE_DIR", str(tmp_path / "bitplan-cache"))
