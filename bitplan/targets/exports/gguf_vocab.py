"""The vocabulary of a GGUF written from a Hugging Face folder, as llama.cpp's converter writes it: a byte-level BPE
vocabulary (Llama 3, Qwen, SmolLM) as ``gpt2`` with its pre-tokenizer named by what it does to a probe text, a
SentencePiece vocabulary in ``tokenizer.json`` form (Gemma) as ``llama`` with each token's score the negated rank
of the merge that makes it (:mod:`bitplan.targets.exports.gguf_source` uses it)."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from bitplan.errors import BitplanError

V = gguf.GGUFValueType
Metadata = list[tuple[str, Any, Any, Any]]

# The probe llama.cpp's converter tokenizes to tell byte-level BPE pre-tokenizers apart, and the sha256 of the
# token ids it gives -> llama.cpp's pre-tokenizer name (llama.cpp's ``convert_hf_to_gguf.py``,
# ``get_vocab_base_pre``): the families of the supported architectures.
PRE_PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
             "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
             "?我想在apple工作1314151天～ ------======= нещо на Български " + "'" * 6
             + "```````\"\"\"\"......!!!!!!?????? "
             + "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5, 2, 2.5, 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}



def _vocabulary(folder: Path, vocab_size: int) -> Metadata:
    """The tokenizer keys of the folder's ``tokenizer.json``, as llama.cpp's converter writes them: a byte-level
    BPE vocabulary as ``gpt2``, a SentencePiece one (BPE with byte fallback) as ``llama``."""
    from tokenizers import Tokenizer

    try:
        spec = json.loads((folder / "tokenizer.json").read_text())
        model_type = spec["model"]["type"]
    except (OSError, ValueError, KeyError):
        spec, model_type = {}, None
    if model_type != "BPE":
        raise BitplanError("a GGUF from a Hugging Face folder needs a BPE tokenizer in tokenizer.json (byte-level, or "
                           f"SentencePiece-style with byte fallback); this folder's is {model_type or 'missing'}")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # as the file says (transformers' classes
    reverse = {index: token for token, index in tokenizer.get_vocab(with_added_tokens=True).items()}  # may add
    added = tokenizer.get_added_tokens_decoder()  # their own rules)
    byte_level = any(step.get("type") == "ByteLevel" for step in _steps(spec.get("pre_tokenizer")))
    if spec["model"].get("byte_fallback") and not byte_level:
        keys = _sentencepiece_keys(spec, reverse, added, vocab_size)
    else:
        keys = _byte_level_keys(tokenizer, reverse, added, vocab_size)
    special = gguf.SpecialVocab(folder, load_merges=keys[0][1] == "gpt2", n_vocab=vocab_size)
    if keys[0][1] == "gpt2":
        keys.append(("tokenizer.ggml.merges", list(special.merges), V.ARRAY, V.STRING))
    for kind, token_id in sorted(special.special_token_ids.items()):  # the gguf package's names: 'unk' is
        key = getattr(gguf.Keys.Tokenizer, f"{kind.upper()}_ID", f"tokenizer.ggml.{kind}_token_id")  # 'unknown'
        keys.append((key, int(token_id), V.UINT32, None))
    for kind, value in sorted(special.add_special_token.items()):
        keys.append((f"tokenizer.ggml.add_{kind}_token", bool(value), V.BOOL, None))
    if special.chat_template:
        keys.append(("tokenizer.chat_template", str(special.chat_template), V.STRING, None))
    return keys


def _byte_level_keys(tokenizer: Any, reverse: dict[int, str], added: dict[int, Any], vocab_size: int) -> Metadata:
    """A byte-level BPE vocabulary (``gpt2``) and its pre-tokenizer's llama.cpp name."""
    digest = sha256(str(tokenizer.encode(PRE_PROBE).ids).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise BitplanError(f"the tokenizer's pre-tokenizer is not one llama.cpp is known to implement "
                           f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}; probe hash {digest[:16]}...)")
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            control = added[index].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
            ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
            ("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32)]


SPM_SPACE = "\u2581"  # SentencePiece's word-boundary mark


def _steps(component: Any) -> list[dict[str, Any]]:
    """The steps of a ``tokenizer.json`` normalizer or pre-tokenizer, a ``Sequence`` flattened (``[]`` for none)."""
    if not isinstance(component, dict):
        return []
    inner = component.get("normalizers", component.get("pretokenizers"))
    if component.get("type") == "Sequence" and inner is not None:
        return [step for part in inner for step in _steps(part)]
    return [component]


def adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece ``tokenizer.json`` puts ``▁`` before the first word (Llama 2's: a ``Prepend``
    normalizer, or a ``Metaspace`` pre-tokenizer that prepends), which llama.cpp's ``add_space_prefix`` does;
    Gemma's does not."""
    if any(s.get("type") == "Prepend" and s.get("prepend") == SPM_SPACE for s in _steps(spec.get("normalizer"))):
        return True
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
               and s.get("add_prefix_space", True) is not False for s in _steps(spec.get("pre_tokenizer")))


def _sentencepiece_keys(spec: dict[str, Any], reverse: dict[int, str], added: dict[int, Any],
                        vocab_size: int) -> Metadata:
    """A SentencePiece vocabulary (``llama``) from its ``tokenizer.json`` form: tokens, scores and types. A token
    made by a merge scores minus that merge's rank (so llama.cpp merges in transformers' order); one made by no
    merge (a single character) scores below every merge; byte tokens ``<0xNN>`` are BYTE, added special tokens
    CONTROL, other added tokens USER_DEFINED (matched in the raw text, as transformers does)."""
    merges = spec["model"].get("merges") or []
    rank: dict[str, int] = {}
    for position, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, position)
    add_space_prefix = adds_space_prefix(spec)
    unknown = spec["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif token == unknown:
            tokens.append(token)
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNKNOWN)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            scores.append(-float(rank[token]) if token in rank else -float(len(merges) + index))
            types.append(gguf.TokenType.NORMAL)
    return [("tokenizer.ggml.model", "llama", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
            ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
            ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
            ("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32),
            ("tokenizer.ggml.add_space_prefix", add_space_prefix, V.BOOL, None)]
