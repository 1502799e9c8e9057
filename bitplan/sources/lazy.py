"""A model reference opened lazily: its skeleton (parameters on the meta device, buffers computed) and a tensor
store, with blocks materialized in place one at a time.

A Hugging Face folder or ``.safetensors`` file opens without reading any weight: the skeleton is built from the
config under ``accelerate.init_empty_weights`` (parameters on ``meta``; non-persistent buffers such as rotary
frequencies computed as usual) and a tensor is read from its shard when the module holding it is materialized.
A GGUF source is dequantized by transformers as today and served from memory (:class:`LoadedTensors`):
materializing then changes nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.errors import ModelReferenceError
from bitplan.sources.moe import checkpoint_aliases
from bitplan.sources.tensors import LoadedTensors, SafetensorsStore, TensorStore


@dataclass(frozen=True)
class Placement:
    """Where and how a streamed model computes (the job options ``device``, ``compute_dtype``, ``max_memory``).

    Attributes:
        device: the device each block and its windows go to; the hidden states between blocks stay on the host.
        dtype: the dtype blocks are materialized and run in (float32 the reference; bfloat16 keeps bf16 weights
            as stored).
        boundary_bytes: hidden states the stream may hold in host memory before spilling to files (``None``: the
            caller's cap), from the job's memory plan (:mod:`bitplan.job.memory_plan`).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    boundary_bytes: int | None = None


@dataclass
class LazyModel:
    """A skeleton and where its tensors come from.

    Attributes:
        model: the model; with ``resident`` false its parameters are on ``meta`` until materialized.
        store: the tensor store (stored dtypes).
        tokenizer, kind, config: as :class:`bitplan.sources.models.LoadedModel` has them.
        resident: every tensor already in memory (a loaded model): materializing is a no-op.
        names: parameter name in ``model`` -> tensor name in ``store`` (prefixes and tied heads resolved).
        placement: where and in what dtype its blocks compute when streamed
            (:class:`bitplan.sources.stream.DecoderStream`).
    """

    model: nn.Module
    store: TensorStore
    tokenizer: Any
    kind: Any
    resident: bool
    names: dict[str, str]
    placement: Placement = field(default_factory=Placement)

    def materialize(self, prefix: str, module: nn.Module, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> None:
        """Give ``module`` (named ``prefix`` in the model) its weights from the store, in ``dtype`` on ``device``,
        in place: the module object, and every reference to its submodules, stays the same."""
        if self.resident:
            return
        for owner_name, owner in module.named_modules(prefix=prefix):
            for name, parameter in list(owner._parameters.items()):
                if parameter is None:
                    continue
                full = f"{owner_name}.{name}" if owner_name else name
                tensor = self.store.get(self.names[full]).to(device=device, dtype=dtype)
                owner._parameters[name] = nn.Parameter(tensor, requires_grad=parameter.requires_grad)
            for name, buffer in list(owner._buffers.items()):
                full = f"{owner_name}.{name}" if owner_name else name
                if buffer is not None and full in self.names:
                    stored = self.store.get(self.names[full])
                    owner._buffers[name] = stored.to(device=device, dtype=dtype if stored.is_floating_point()
                                                     else stored.dtype)

    def release(self, module: nn.Module) -> None:
        """Drop ``module``'s weights (back to ``meta``); a resident model keeps them."""
        if self.resident:
            return
        for owner in module.modules():
            for name, parameter in list(owner._parameters.items()):
                if parameter is not None:
                    owner._parameters[name] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                                           requires_grad=parameter.requires_grad)
        trim_heap()

    @contextlib.contextmanager
    def materialized(self, prefix: str, module: nn.Module, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> Iterator[nn.Module]:
        """``module`` with its weights, frozen, for the duration of the ``with`` block."""
        self.materialize(prefix, module, dtype=dtype, device=device)
        flags = {parameter: parameter.requires_grad for parameter in module.parameters()}
        module.requires_grad_(False)  # gradients flow to the hidden states only, never into weight gradients
        try:
            yield module
        finally:
            for parameter, flag in flags.items():
                parameter.requires_grad_(flag)
            self.release(module)

    def parameters(self) -> int:
        """Elements of the model's tensors (a tied tensor once)."""
        return sum(math.prod(self.store.shape(n)) for n in set(self.names.values()))

    def stored_bytes(self) -> int:
        """Bytes of the model's tensors as stored (what a whole load in the stored dtype would take)."""
        return sum(math.prod(self.store.shape(n)) * self.store.dtype(n).itemsize for n in set(self.names.values()))


def open_lazy(reference: str) -> LazyModel:
    """Open a model reference without reading its weights (a GGUF is loaded and dequantized as by
    :func:`bitplan.sources.models.load_model`, and served from memory)."""
    from bitplan.sources.models import load_model, resolve_reference

    source_format, path = resolve_reference(reference)
    if source_format == "gguf":
        loaded = load_model(reference)
        names = {name: name for name in loaded.model.state_dict()}
        return LazyModel(model=loaded.model, store=LoadedTensors(loaded.model), tokenizer=loaded.tokenizer,
                         kind=loaded.kind, resident=True, names=names)
    folder = path if path.is_dir() else path.parent
    store = SafetensorsStore.of_folder(folder) if path.is_dir() else SafetensorsStore([path])
    model, tokenizer, kind = _skeleton(folder, reference)
    return LazyModel(model=model, store=store, tokenizer=tokenizer, kind=kind, resident=False,
                     names=match_names(model, store, reference))


def _skeleton(folder: Path, reference: str) -> tuple[nn.Module, Any, Any]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    from bitplan.sources.models import _auto_class, _kind_of
    from bitplan.sources.moe import unfuse_experts

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:
        raise ModelReferenceError(f"cannot read config.json of {reference!r}: {error}") from None
    kind = _kind_of(config, reference)
    with init_empty_weights(include_buffers=False):
        model = _auto_class(kind).from_config(config)
        unfuse_experts(model)  # one nn.Linear per expert projection, named as the checkpoint names it
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise ModelReferenceError(f"{reference!r} has no usable tokenizer files beside config.json ({error})") from None
    return model, tokenizer, kind


def match_names(model: nn.Module, store: TensorStore, reference: str) -> dict[str, str]:
    """Each parameter (and persistent buffer) of ``model`` -> its tensor in ``store``: the same name, or with the
    base model's prefix added or removed; a tied output head reads the input embedding's tensor. A tensor the
    model needs that the store lacks, or one the store holds that the model does not use, refuses the model."""
    available = set(store.names())
    prefix = getattr(model, "base_model_prefix", "") + "."
    tied = _tied_names(model)
    names: dict[str, str] = {}
    missing = []
    for name in model.state_dict():
        candidates = [name, name[len(prefix):] if name.startswith(prefix) else prefix + name]
        candidates += [alias for candidate in candidates for alias in checkpoint_aliases(candidate)]
        found = next((c for c in candidates if c in available), None)
        if found is None and name in tied:
            found = names.get(tied[name])
        if found is None:
            if not name.endswith("position_ids"):
                missing.append(name)
            continue
        names[name] = found
    if missing:
        raise ModelReferenceError(f"{reference!r} lacks {len(missing)} weights the config needs, e.g. {missing[:3]}")
    unused = sorted(available - set(names.values()))
    if unused:
        raise ModelReferenceError(f"{reference!r} holds {len(unused)} weights the config does not use, e.g. "
                                  f"{unused[:3]}")
    return names


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Output head weight name -> input embedding weight name, when the config ties them."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None:
        return {}
    by_module = {id(m): n for n, m in model.named_modules()}
    return {f"{by_module[id(head)]}.weight": f"{by_module[id(embedding)]}.weight"}


def trim_heap() -> None:
    """Give the memory freed with a block back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A block's tensors under 32 MiB (a MoE layer's 384 experts of 6 MiB each) come from malloc's heap, not from
    ``mmap``: freed, they stay in the process, and the next block's tensors and the encoders' temporaries fragment
    that heap, so the resident memory grows from block to block. Measured on one Qwen3-30B-A3B-shaped layer
    (``bench/moe.py``'s shape, 2 windows of 128, 2 types): a peak of 4.52 GiB before, 3.68 GiB with freed memory
    returned (the memory plan said 3.86)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def return_freed_memory_promptly(threshold: int = 1 << 20) -> None:
    """Allocate every tensor of at least ``threshold`` bytes with its own ``mmap`` from now on (glibc's
    ``M_MMAP_THRESHOLD``, fixed: no longer raised to the size of the largest block freed), so that freeing it
    unmaps it. For a process that streams blocks (:mod:`bitplan.job.streamed_job`): on the MoE layer of
    :func:`trim_heap`, a peak of 3.68 GiB against 4.06 with trimming alone and 4.52 with neither."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, threshold)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _glibc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
