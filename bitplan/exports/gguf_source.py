"""What a GGUF we write takes from the model it was made from: the architecture, the metadata (hyperparameters,
tokenizer, chat template), the tensors' names, order and source types.

Two kinds of source. A GGUF file gives all of it as it is (every key but the file type is copied). A Hugging Face
folder (config, safetensors, ``tokenizer.json``) of a supported architecture (:data:`HF_ARCHITECTURES`: Llama,
Qwen2, Qwen3) gives it the way llama.cpp's own converter does: the hyperparameters under the architecture's keys,
tensor names from the ``gguf`` package's map, the byte-level BPE vocabulary (tokens with their types, merges and
special tokens through ``gguf.SpecialVocab``) and the pre-tokenizer named by what it does to a probe text
(:data:`PRE_TOKENIZERS`). Anything else is refused, naming what is supported.
"""

from __future__ import annotations

import dataclasses
import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bitplan.errors import BitplanError

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

# transformers' class -> the gguf package's architecture; llama's q/k rows are permuted for its rotary layout
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

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


@dataclasses.dataclass
class SourceTensor:
    """One tensor of the file to write, in the source's order: its name, the source's type (``None`` for a Hugging
    Face tensor: ours decide), and the raw data of a tensor the model does not hold as a parameter."""

    name: str
    tensor_type: Any
    n_bytes: int = 0
    data: np.ndarray | None = None


OUTPUT, EMBEDDING = "output.weight", "token_embd.weight"


@dataclasses.dataclass
class GgufSource:
    arch: str
    block_count: int
    metadata: list[tuple[str, Any, Any, Any]]  # key, value, value type, element type (arrays)
    tensors: list[SourceTensor]
    heads: dict[str, int]  # attn_q / attn_k -> heads (llama's row permutation)

    def name_map(self) -> Any:
        arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(self.arch)
        if arch_id is None:
            raise BitplanError(f"the gguf package does not know the architecture {self.arch!r}")
        return gguf.TensorNameMap(arch_id, self.block_count)

    def gguf_name(self, hf_name: str) -> str | None:
        return self.name_map().get_name(hf_name, try_suffixes=(".weight", ".bias"))  # type: ignore[no-any-return]

    def unit_tensor(self, unit: str) -> str | None:
        """The file's tensor of a unit's weight: a tied output head is the file's ``token_embd`` (a file of a tied
        model has no ``output.weight``; llama.cpp runs the head on the embedding tensor)."""
        name = self.gguf_name(f"{unit}.weight")
        names = {t.name for t in self.tensors}
        if name == OUTPUT and OUTPUT not in names and EMBEDDING in names:
            return EMBEDDING
        return name


def open_source(path: Path, hf_tensors: dict[str, tuple[int, ...]] | None = None) -> GgufSource:
    """The GGUF file at ``path``, or the Hugging Face folder at ``path`` whose parameters are ``hf_tensors``
    (name -> shape; by default read from its safetensors files)."""
    if path.is_dir():
        return _from_hf_folder(path, hf_tensors)
    return _from_gguf(path)


def _from_gguf(path: Path) -> GgufSource:
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    metadata = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        value_type = field.types[0]
        metadata.append((field.name, field.contents(), value_type,
                         field.types[-1] if value_type == V.ARRAY else None))
    heads = {"attn_q": int(reader.fields[f"{arch}.attention.head_count"].contents())}
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    heads["attn_k"] = int(kv_field.contents()) if kv_field is not None else heads["attn_q"]
    tensors = [SourceTensor(t.name, t.tensor_type, int(t.n_bytes), np.asarray(t.data)) for t in reader.tensors]
    return GgufSource(arch=arch, block_count=int(reader.fields[f"{arch}.block_count"].contents()),
                      metadata=metadata, tensors=tensors, heads=heads)


def _from_hf_folder(folder: Path, hf_tensors: dict[str, tuple[int, ...]] | None) -> GgufSource:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise BitplanError(f"the source folder has no readable config.json: {error}") from None
    architectures = config.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in architectures if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise BitplanError(f"a GGUF from a Hugging Face folder is written for the architectures "
                           f"{', '.join(HF_ARCHITECTURES)}; this model is {architectures or 'of no named architecture'}"
                           " (a GGUF source file works for any architecture llama.cpp knows)")
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0),
                                             **(config.get("rope_scaling") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise BitplanError(f"rope scaling {rope_type!r} is not written into GGUF files yet (default and linear are)")
    if config.get("use_sliding_window"):
        raise BitplanError("sliding-window attention is not written into GGUF files yet")
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or
                                                             config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    blocks = int(config["num_hidden_layers"])
    u32, f32 = V.UINT32, V.FLOAT32
    metadata: list[tuple[str, Any, Any, Any]] = [
        ("general.type", "model", V.STRING, None),
        ("general.name", str(config.get("_name_or_path") or folder.name), V.STRING, None),
        (f"{arch}.block_count", blocks, u32, None),
        (f"{arch}.context_length", int(config.get("max_position_embeddings", 2048)), u32, None),
        (f"{arch}.embedding_length", int(config["hidden_size"]), u32, None),
        (f"{arch}.feed_forward_length", int(config["intermediate_size"]), u32, None),
        (f"{arch}.attention.head_count", heads, u32, None),
        (f"{arch}.attention.head_count_kv", kv_heads, u32, None),
        (f"{arch}.rope.freq_base", float(rope.get("rope_theta", 10000.0)), f32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), f32, None),
        (f"{arch}.attention.key_length", head_dim, u32, None),
        (f"{arch}.attention.value_length", head_dim, u32, None),
        (f"{arch}.rope.dimension_count", head_dim, u32, None),
        (f"{arch}.vocab_size", int(config["vocab_size"]), u32, None),
    ]
    if rope_type == "linear":
        metadata += [(f"{arch}.rope.scaling.type", "linear", V.STRING, None),
                     (f"{arch}.rope.scaling.factor", float(rope["factor"]), f32, None)]
    metadata += _bpe_vocabulary(folder, int(config["vocab_size"]))
    shapes = hf_tensors if hf_tensors is not None else safetensors_shapes(folder)
    source = GgufSource(arch=arch, block_count=blocks, metadata=metadata, tensors=[],
                        heads={"attn_q": heads, "attn_k": kv_heads})
    names = []
    for hf_name in shapes:
        name = source.gguf_name(hf_name)
        if name is None:
            raise BitplanError(f"the tensor {hf_name!r} has no GGUF name for the {arch} architecture")
        names.append(name)
    source.tensors = [SourceTensor(name, None) for name in sorted(names, key=_file_order)]
    return source


def _file_order(name: str) -> tuple[int, int, str]:
    """llama.cpp's converter's order: the embedding, the blocks in order, then the output norm and head."""
    parts = name.split(".")
    if parts[0] == "blk":
        return 1, int(parts[1]), name
    return (0, 0, name) if parts[0] == "token_embd" else (2, 0, name)


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _bpe_vocabulary(folder: Path, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """The tokenizer keys of a byte-level BPE tokenizer, as llama.cpp's converter writes them."""
    from tokenizers import Tokenizer

    try:
        model_type = json.loads((folder / "tokenizer.json").read_text())["model"]["type"]
    except (OSError, ValueError, KeyError):
        model_type = None
    if model_type != "BPE":
        raise BitplanError("a GGUF from a Hugging Face folder needs a byte-level BPE tokenizer (tokenizer.json); "
                           f"this folder's is {model_type or 'missing'} (SentencePiece vocabularies are not written "
                           "yet)")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # as the file says (transformers' classes
    digest = sha256(str(tokenizer.encode(PRE_PROBE).ids).encode()).hexdigest()  # may add their own rules)
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise BitplanError(f"the tokenizer's pre-tokenizer is not one llama.cpp is known to implement "
                           f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}; probe hash {digest[:16]}...)")
    reverse = {index: token for token, index in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
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
    keys = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
            ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
            ("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32)]
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    keys.append(("tokenizer.ggml.merges", list(special.merges), V.ARRAY, V.STRING))
    for kind, token_id in sorted(special.special_token_ids.items()):
        keys.append((f"tokenizer.ggml.{kind}_token_id", int(token_id), V.UINT32, None))
    for kind, value in sorted(special.add_special_token.items()):
        keys.append((f"tokenizer.ggml.add_{kind}_token", bool(value), V.BOOL, None))
    if special.chat_template:
        keys.append(("tokenizer.chat_template", str(special.chat_template), V.STRING, None))
    return keys
