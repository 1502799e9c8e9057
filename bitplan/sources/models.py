"""Model references -> torch modules: bundled ids, Hugging Face folders, ``.safetensors`` and ``.gguf`` files.

Pickle-based formats are never opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.errors import ModelReferenceError
from bitplan.hashing import sha256_file
from bitplan.sources.bundled_models import BUNDLED_MODELS, BundledModel  # noqa: F401 - BundledModel: re-exported
from bitplan.sources.moe import unfuse_experts

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
ACCEPTED = ("a bundled id ({ids}), a Hugging Face style folder (config.json + *.safetensors), "
            "a .safetensors file with config.json beside it, or a .gguf file")


class ModelKind(str, Enum):
    """What the model computes; decides the loss and the evaluation available."""

    CAUSAL_LM = "causal-lm"
    ENCODER = "encoder"


@dataclass
class LoadedModel:
    """A float model ready for calibration, with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    kind: ModelKind
    reference: str
    source_format: str
    source_path: Path
    source_sha256: str
    lazy: Any = None  # a bitplan.sources.LazyModel when ``model`` is its skeleton (weights on meta)


def _accepted() -> str:
    return ACCEPTED.format(ids=", ".join(BUNDLED_MODELS))


def validate_safetensors_header(path: Path) -> None:
    """Check a safetensors file's header before any loader touches it: a JSON header that fits in the file,
    and every tensor's byte range inside the data section with a size consistent with its dtype and shape."""
    if not path.is_file():
        raise ModelReferenceError(f"{path.name} is not a regular file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelReferenceError(f"{path} is not a safetensors file: it is shorter than its 8-byte header size")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, 100 << 20):
            raise ModelReferenceError(f"{path} is not a valid safetensors file: its header claims {header_len} bytes "
                                      f"but the file has {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelReferenceError(f"{path} has a corrupt safetensors header ({error})") from None
    data_size = size - 8 - header_len
    if not isinstance(header, dict):
        raise ModelReferenceError(f"{path} has a corrupt safetensors header (not a JSON object)")
    ranges = _tensor_ranges(path, header, data_size)
    ranges.sort()
    for (start, end, name), (next_start, _, next_name) in zip(ranges, ranges[1:]):
        if next_start < end:
            raise ModelReferenceError(f"{path}: tensors {name!r} and {next_name!r} overlap in the data section")


def _tensor_ranges(path: Path, header: dict[str, Any], data_size: int) -> list[tuple[int, int, str]]:
    """Each tensor's byte range, checked against its dtype, shape and the data section."""
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in entry["data_offsets"])
            dims = [int(d) for d in entry["shape"]]
            itemsize = _SAFETENSORS_ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelReferenceError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if any(d < 0 for d in dims):
            raise ModelReferenceError(f"{path}: tensor {name!r} has a negative dimension {dims}")
        if not 0 <= start <= end <= data_size or end - start != math.prod(dims) * itemsize:
            raise ModelReferenceError(f"{path}: tensor {name!r} has byte range [{start}, {end}) inconsistent with "
                                      f"its shape and dtype or outside the file's {data_size} data bytes")
        ranges.append((start, end, name))
    return ranges


_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _kind_of(config: Any, reference: str) -> ModelKind:
    architectures = list(getattr(config, "architectures", None) or [])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if any(a.endswith("ForCausalLM") for a in architectures) or (
        not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return ModelKind.CAUSAL_LM
    if config.model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra"):
        return ModelKind.ENCODER
    raise ModelReferenceError(
        f"unsupported architecture {config.model_type!r} ({', '.join(architectures) or 'no architectures'}) in "
        f"{reference!r}: bitplan accepts causal language models that transformers implements "
        f"(Llama, Mistral, Qwen, GPT-2, ...) and BERT-style encoders")


def resolve_reference(reference: str) -> tuple[str, Path]:
    """Classify a reference as ``gguf``, ``hf-folder`` or ``safetensors`` and return its path, refusing pickles."""
    if reference in BUNDLED_MODELS:
        path = BUNDLED_MODELS[reference].path()
    else:
        path = Path(reference).expanduser()
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelReferenceError(
                f"refusing {reference!r}: {path.suffix} files are Python pickles, which can run arbitrary code "
                f"when loaded. Convert the weights to safetensors (safetensors.torch.save_file) and pass the "
                f"folder or .safetensors file instead")
        if not path.exists():
            raise ModelReferenceError(f"model reference {reference!r} is neither a bundled id nor an existing path; "
                                      f"expected {_accepted()}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return "gguf", path
        if suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise ModelReferenceError(f"{reference!r} is a .safetensors file without a config.json beside it; "
                                          f"put the model's config.json in {path.parent}")
            return "safetensors", path
        raise ModelReferenceError(f"unsupported model file {reference!r}; expected {_accepted()}")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelReferenceError(f"folder {reference!r} has no config.json; expected {_accepted()}")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        hint = f" It holds pickle weights ({', '.join(pickles)}): convert them to safetensors." if pickles else ""
        raise ModelReferenceError(f"folder {reference!r} has no .safetensors weights.{hint}")
    return "hf-folder", path


def _auto_class(kind: ModelKind) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM if kind is ModelKind.CAUSAL_LM else transformers.AutoModel


def validate_gguf(path: Path) -> None:
    """Parse a GGUF file's header with the ``gguf`` package and check every tensor lies inside the file."""
    import struct

    from gguf import GGUFReader

    if not path.is_file():
        raise ModelReferenceError(f"{path.name} is not a regular file")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except (ValueError, struct.error, OSError, IndexError, KeyError, UnicodeDecodeError) as error:
        raise ModelReferenceError(f"{path} is not a valid GGUF file ({error})") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelReferenceError(f"{path}: tensor {tensor.name!r} ends at byte {end}, past the file's {size} "
                                      f"bytes (truncated file?)")


def _load_gguf(path: Path, reference: str) -> tuple[nn.Module, Any, ModelKind]:
    from bitplan.sources.gguf_once import gguf_parsed_once

    with gguf_parsed_once():  # transformers and bitplan open the file seven times: one header parse
        return _load_gguf_parsed(path, reference)


def _load_gguf_parsed(path: Path, reference: str) -> tuple[nn.Module, Any, ModelKind]:
    from transformers import AutoConfig, AutoTokenizer

    validate_gguf(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as error:
        raise ModelReferenceError(f"cannot read GGUF file {reference!r}: {error}") from None
    kind = _kind_of(config, reference)
    model = _auto_class(kind).from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model is a plain float model after dequantization; drop the quantizer marker so its config
    # can be written with the artifact.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _remember_source_blocks(path)
    return model, tokenizer, kind


def _remember_source_blocks(path: Path) -> None:
    """The file's quantized matrices, for a layer that keeps its source type to keep its source blocks (llama.cpp's
    quantizer does not find them again from the decoded values): :func:`bitplan.quantizer.ggml.quantize_ggml`."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    from bitplan.quantizer.ggml import remember_source_blocks

    floats = (T.F32, T.F16, T.BF16, T.F64)
    tensors = [(t.tensor_type, t.data) for t in GGUFReader(path).tensors
               if len(t.data.shape) == 2 and t.tensor_type not in floats]
    remember_source_blocks(str(path.resolve()), tensors)


def _load_safetensors(path: Path, folder: Path, reference: str) -> tuple[nn.Module, Any, ModelKind]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:
        raise ModelReferenceError(f"cannot read config.json of {reference!r}: {error}") from None
    quantized = getattr(config, "quantization_config", None)
    if quantized is not None:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method",
                                                                                            None)
        raise ModelReferenceError(f"{reference!r} is already quantized ({method}); give the model it was made from "
                                  "(a bitplan artifact loads with bitplan.targets.artifact.load_artifact)",
                                  param="model")
    kind = _kind_of(config, reference)
    auto = _auto_class(kind)
    for weights in sorted(folder.glob("*.safetensors")) if path.is_dir() else [path]:
        validate_safetensors_header(weights)
    try:
        if path.is_dir():
            model, info = auto.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                               output_loading_info=True)
            _refuse_incomplete(reference, config, info["missing_keys"], info["unexpected_keys"])
            if info.get("mismatched_keys"):
                first = list(info["mismatched_keys"])[:3]
                raise ModelReferenceError(f"{reference!r} holds {len(info['mismatched_keys'])} weights whose shape "
                                          f"differs from what its config needs, e.g. {first}")
        else:
            model = _from_single_safetensors(auto, config, path, reference)
    except (ValueError, OSError, RuntimeError) as error:
        if isinstance(error, ModelReferenceError):
            raise
        raise ModelReferenceError(f"cannot load weights of {reference!r}: {error}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise ModelReferenceError(f"{reference!r} has no usable tokenizer files beside config.json ({error})") from None
    return model, tokenizer, kind


def _refuse_incomplete(reference: str, config: Any, missing: Any, unexpected: Any) -> None:
    """A weight the config needs that the files lack would be initialized at random: refuse the model (and one the
    model does not know would be dropped)."""
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not k.endswith("position_ids") and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ModelReferenceError(f"{reference!r} lacks {len(missing)} weights the config needs, e.g. {missing[:3]}")
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if unexpected:
        raise ModelReferenceError(f"{reference!r} holds {len(unexpected)} weights the config does not use, e.g. "
                                  f"{unexpected[:3]}")


def _from_single_safetensors(auto: Any, config: Any, path: Path, reference: str) -> nn.Module:
    from safetensors.torch import load_file

    model = auto.from_config(config, dtype=torch.float32)
    state = load_file(str(path))
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    if not expected & set(state):
        state = {k[len(prefix):] if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if missing:
        raise ModelReferenceError(f"{reference!r} lacks {len(missing)} weights the config needs, e.g. {missing[:3]}")
    if tied:
        model.tie_weights()
    return model


def load_model(reference: str) -> LoadedModel:
    """Load a float32 model in eval mode from any accepted reference. Whatever the files make a loader fail with
    is the reference's fault: it comes back as :class:`ModelReferenceError` (not retryable), never as an internal
    error."""
    source_format, path = resolve_reference(reference)
    try:
        if source_format == "gguf":
            model, tokenizer, kind = _load_gguf(path, reference)
        else:
            model, tokenizer, kind = _load_safetensors(path, path if path.is_dir() else path.parent, reference)
    except ModelReferenceError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a malformed file can make a loader raise anything
        raise ModelReferenceError(f"cannot load {reference!r}: {type(error).__name__}: {error}") from None
    nn.Module.float(model).eval()
    unfuse_experts(model)  # a MoE layer's experts as nn.Linear units (bitplan.sources.moe)
    digest_target = path if path.is_file() else sorted(path.glob("*.safetensors"))[0]
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, reference=reference,
                       source_format=source_format, source_path=path, source_sha256=sha256_file(digest_target))


def causal_lm_loss(model: nn.Module, tokens: torch.Tensor, *, graph_from_embeddings: bool = True) -> torch.Tensor:
    """Summed next-token cross-entropy of ``tokens (batch, seq_len)``, by default with a graph from the input
    embeddings (so that output gradients exist even when no parameter requires grad); ``torch.func`` transforms
    need ``graph_from_embeddings=False``."""
    return text_loss_of_logits(next_token_logits(model, tokens, graph_from_embeddings=graph_from_embeddings), tokens)


def text_loss_of_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of next-token ``logits (batch * (seq_len - 1), vocab)`` against the text ``tokens
    (batch, seq_len)``: :func:`causal_lm_loss` from logits a caller computed (the streamed model's head)."""
    return nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction="sum")


def next_token_logits(model: nn.Module, tokens: torch.Tensor, *, graph_from_embeddings: bool = True) -> torch.Tensor:
    """``(batch * (seq_len - 1), vocab)`` float32 logits of every position that predicts a next token, by default
    with a graph from the input embeddings (:func:`causal_lm_loss`)."""
    if graph_from_embeddings:
        embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits[:, :-1].float()
    else:
        logits = model(input_ids=tokens).logits[:, :-1].float()
    return logits.reshape(-1, logits.shape[-1])


def causal_lm_sampled_loss(model: nn.Module, tokens: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of ``tokens (batch, seq_len)`` against labels drawn from the model's own
    (detached) next-token distribution instead of the text's next tokens, with a graph from the input embeddings.

    Its output gradients at position ``s`` are ``p_s - onehot(y_s)`` with ``y_s ~ p_s``: zero-mean, independent
    across positions, and with covariance ``diag(p_s) - p_s p_s^T``, so the expected square of any projection of
    them is the Fisher of the model's predictive distribution, the Hessian of the KL divergence from this model's
    outputs (what the ``token_kl`` metric sums). The text's labels give the *empirical* Fisher instead, whose
    square also carries the squared mean gradient of the text, large where the model is far from a stationary
    point of that text (the attention sink's position, summing every later token's gradient).

    The draw is seeded by ``seed``, by default by the tokens themselves: the same window gets the same labels in
    every pass and every job."""
    return sampled_loss_of_logits(next_token_logits(model, tokens), tokens, seed=seed)


def sampled_loss_of_logits(flat: torch.Tensor, tokens: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
    """:func:`causal_lm_sampled_loss` from next-token logits ``(batch * (seq_len - 1), vocab)`` a caller computed:
    the same labels for the same window (seeded by its tokens)."""
    if seed is None:
        seed = int(hashlib.sha256(tokens.detach().cpu().long().numpy().tobytes()).hexdigest()[:15], 16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        labels = torch.multinomial(flat.softmax(dim=-1), 1, generator=generator)[:, 0]
    return nn.functional.cross_entropy(flat, labels, reduction="sum")


def use_eager_attention(model: nn.Module) -> None:
    """Second-order autograd needs eager attention (SDPA's CPU kernel has no double backward)."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"
