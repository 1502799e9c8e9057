"""What a GGUF we write takes from the model it was made from: the architecture, the metadata (hyperparameters,
tokenizer, chat template), the tensors' names, order and source types.

Two kinds of source. A GGUF file gives all of it as it is (every key but the file type is copied). A Hugging Face
folder (config, safetensors, ``tokenizer.json``) of a supported architecture (:data:`HF_ARCHITECTURES`: Llama,
Qwen2, Qwen3, Gemma3) gives it the way llama.cpp's own converter does: the hyperparameters under the
architecture's keys, tensor names from the ``gguf`` package's map, and the vocabulary. A byte-level BPE vocabulary
(Llama 3, Qwen, SmolLM) is written as ``gpt2`` (tokens with their types, merges, special tokens through
``gguf.SpecialVocab``) with the pre-tokenizer named by what it does to a probe text (:data:`PRE_TOKENIZERS`); a
SentencePiece vocabulary in ``tokenizer.json`` form (BPE with byte fallback on ``▁``-joined words: Gemma) is
written as ``llama``, each token's score the negated rank of the merge that makes it (llama.cpp's SentencePiece
tokenizer merges the highest-scoring pair first, transformers' BPE the lowest-ranked merge: the same order).
Anything else is refused, naming what is supported, and so is a Gemma3 configuration llama.cpp would run
differently from transformers (:func:`_gemma3_metadata`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bitplan.errors import BitplanError
from bitplan.targets.exports.gguf_vocab import _sentencepiece_keys, _vocabulary, adds_space_prefix  # noqa: F401 (re-exported)

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

# transformers' class -> the gguf package's architecture; llama's q/k rows are permuted for its rotary layout
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                    "Gemma3ForCausalLM": "gemma3", "Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe",
                    "MixtralForCausalLM": "llama"}  # llama.cpp runs Mixtral as llama with experts

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
        """The file's tensor holding ``hf_name``: a routed expert's projection is one slice of its layer's 3-D
        ``ffn_{gate,up,down}_exps`` tensor (:func:`expert_slice`)."""
        merged = expert_slice(hf_name)
        name = hf_name if merged is None else merged[0]
        return self.name_map().get_name(name, try_suffixes=(".weight", ".bias"))  # type: ignore[no-any-return]

    def tensor_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> its shape (rows first), from the checkpoint's ``shapes``: an expert stack is
        ``(experts, rows, columns)``."""
        stacked: dict[str, tuple[int, ...]] = {}
        for gguf_name, hf_names in self.sources_of(shapes).items():
            first = shapes[hf_names[0]]
            stacked[gguf_name] = first if expert_slice(hf_names[0]) is None else (len(hf_names), *first)
        return stacked

    def sources_of(self, hf_names: Iterable[str]) -> dict[str, list[str]]:
        """GGUF tensor name -> the checkpoint tensors it holds: one, or an expert stack's in expert order (every
        expert present, or the stack is refused)."""
        grouped: dict[str, list[tuple[int, str]]] = {}
        for hf_name in hf_names:
            name = self.gguf_name(hf_name)
            if name is None:
                raise BitplanError(f"the tensor {hf_name!r} has no GGUF name for the {self.arch} architecture")
            merged = expert_slice(hf_name)
            grouped.setdefault(name, []).append((-1 if merged is None else merged[1], hf_name))
        result = {}
        for name, members in grouped.items():
            members.sort()
            if len(members) > 1 and [index for index, _ in members] != list(range(len(members))):
                raise BitplanError(f"the experts of {name} are not numbered 0..{len(members) - 1}")
            result[name] = [hf_name for _, hf_name in members]
        return result

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
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or
                                                             config["num_attention_heads"])
    blocks = int(config["num_hidden_layers"])
    metadata = [("general.type", "model", V.STRING, None),
                ("general.name", str(config.get("_name_or_path") or folder.name), V.STRING, None),
                ("general.quantization_version", gguf.GGML_QUANT_VERSION, V.UINT32, None),  # as llama.cpp's own
                *(_gemma3_metadata(config) if arch == "gemma3" else _llama_metadata(arch, config))]
    metadata += _vocabulary(folder, int(config["vocab_size"]))
    shapes = hf_tensors if hf_tensors is not None else safetensors_shapes(folder)
    source = GgufSource(arch=arch, block_count=blocks, metadata=metadata, tensors=[],
                        heads={"attn_q": heads, "attn_k": kv_heads})
    source.tensors = [SourceTensor(name, None) for name in sorted(source.sources_of(shapes), key=_file_order)]
    return source


_EXPERT_TENSOR = re.compile(r"^(?P<stack>.*\.experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")


def expert_slice(hf_name: str) -> tuple[str, int] | None:
    """``(the expert stack's merged name, expert index)`` of a routed expert's checkpoint tensor
    (``….experts.3.gate_proj.weight`` -> ``….experts.gate_proj.weight``, 3), as llama.cpp's converter merges
    them into one 3-D tensor; ``None`` for any other tensor."""
    match = _EXPERT_TENSOR.match(hf_name)
    if match is None:
        return None
    return f"{match['stack']}.{match['rest']}", int(match["expert"])


Metadata = list[tuple[str, Any, Any, Any]]


def _llama_metadata(arch: str, config: dict[str, Any]) -> Metadata:
    """Llama, Qwen2 and Qwen3 hyperparameters under ``arch``'s keys, as llama.cpp's converter writes them."""
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
    u32, f32 = V.UINT32, V.FLOAT32
    metadata: Metadata = [
        (f"{arch}.block_count", int(config["num_hidden_layers"]), u32, None),
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
    experts = config.get("num_experts") or config.get("num_local_experts")  # transformers 5 saves the latter
    return metadata + (_expert_metadata(arch, config, int(experts)) if experts else [])


# whether llama.cpp renormalizes a MoE architecture's top-k routing weights (its graph's fixed choice)
RENORMALIZES_TOP_K = {"qwen3moe": True, "llama": True, "olmoe": False}


def _expert_metadata(arch: str, config: dict[str, Any], experts: int) -> Metadata:
    """A mixture-of-experts model's expert keys, as llama.cpp's converter writes them (Qwen3-MoE, OLMoE, Mixtral
    as llama). What llama.cpp fixes for the architecture (every layer sparse, whether the top-k weights are
    renormalized) is checked, and a model that differs is refused rather than written to run differently."""
    problems = []
    if int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
        problems.append("dense layers between the sparse ones (decoder_sparse_step, mlp_only_layers)")
    renormalized = bool(config.get("norm_topk_prob", arch == "llama"))  # Mixtral's router always renormalizes
    if arch == "olmoe" and int(config.get("num_key_value_heads") or config["num_attention_heads"]) != int(
            config["num_attention_heads"]):
        problems.append("grouped key/value heads (llama.cpp's olmoe norms k over the full width)")
    if arch not in RENORMALIZES_TOP_K:
        problems.append("an architecture whose experts are not written yet")
    elif renormalized != RENORMALIZES_TOP_K[arch]:
        problems.append(f"top-k routing weights {'' if renormalized else 'not '}renormalized (norm_topk_prob "
                        f"{str(renormalized).lower()}), where llama.cpp's {arch} does the opposite")
    if problems:
        raise BitplanError(f"this {arch} model would run differently in llama.cpp than in transformers: "
                           + "; ".join(problems))
    u32 = V.UINT32
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    return [(f"{arch}.expert_count", experts, u32, None),
            (f"{arch}.expert_used_count", int(config["num_experts_per_tok"]), u32, None),
            (f"{arch}.expert_feed_forward_length", int(width), u32, None)]


GEMMA3_SWA_PATTERN = 6  # llama.cpp runs every sixth Gemma3 layer with full attention, the others in the window
GEMMA3_SWA_ROPE_BASE = 10000.0  # and the windowed layers' rotary base at this (it reads no key for it)


def _gemma3_metadata(config: dict[str, Any]) -> Metadata:
    """Gemma3 hyperparameters as llama.cpp's converter writes them (the keys of the bundled gemma-3-270m GGUF).
    What llama.cpp does not read but fixes for the architecture (the window pattern, the windowed layers' rotary
    base, the attention scale ``1/sqrt(head_dim)``, no soft-capping) is checked against the configuration, and a
    model that differs is refused rather than written to run differently in llama.cpp than in transformers."""
    blocks = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    expected = ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention" for i in range(blocks)]
    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention") or {"rope_theta": config.get("rope_theta", 1_000_000.0),
                                          **(config.get("rope_scaling") or {})}
    local = rope.get("sliding_attention") or {"rope_theta": config.get("rope_local_base_freq", GEMMA3_SWA_ROPE_BASE)}
    full_type = full.get("rope_type", full.get("type", "default"))
    problems = []
    if list(config.get("layer_types") or expected) != expected:
        problems.append(f"layer_types other than every {GEMMA3_SWA_PATTERN}th layer full-attention")
    if float(local.get("rope_theta", GEMMA3_SWA_ROPE_BASE)) != GEMMA3_SWA_ROPE_BASE or \
            local.get("rope_type", "default") != "default":
        problems.append(f"a sliding-window rotary base other than plain {GEMMA3_SWA_ROPE_BASE:g}")
    if full_type not in ("default", "linear"):
        problems.append(f"rope scaling {full_type!r} (default and linear are written)")
    if float(config.get("query_pre_attn_scalar") or head_dim) != head_dim:
        problems.append(f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')} != head_dim {head_dim}")
    if config.get("attn_logit_softcapping") is not None or config.get("final_logit_softcapping") is not None:
        problems.append("logit soft-capping")
    if config.get("use_bidirectional_attention"):
        problems.append("bidirectional attention")
    if problems:
        raise BitplanError("this Gemma3 model would run differently in llama.cpp than in transformers: "
                           + "; ".join(problems) + " (give its GGUF file as the source instead)")
    u32, f32 = V.UINT32, V.FLOAT32
    metadata: Metadata = [
        ("gemma3.context_length", int(config.get("max_position_embeddings", 131072)), u32, None),
        ("gemma3.embedding_length", int(config["hidden_size"]), u32, None),
        ("gemma3.block_count", blocks, u32, None),
        ("gemma3.feed_forward_length", int(config["intermediate_size"]), u32, None),
        ("gemma3.attention.head_count", heads, u32, None),
        ("gemma3.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), f32, None),
        ("gemma3.attention.key_length", head_dim, u32, None),
        ("gemma3.attention.value_length", head_dim, u32, None),
        ("gemma3.rope.freq_base", float(full.get("rope_theta", 1_000_000.0)), f32, None),
        ("gemma3.attention.sliding_window", int(config["sliding_window"]), u32, None),
        ("gemma3.attention.head_count_kv", int(config.get("num_key_value_heads") or heads), u32, None),
    ]
    if full_type == "linear":  # llama.cpp applies it to the full-attention layers only, as transformers does
        metadata += [("gemma3.rope.scaling.type", "linear", V.STRING, None),
                     ("gemma3.rope.scaling.factor", float(full["factor"]), f32, None)]
    return metadata


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
