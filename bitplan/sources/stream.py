"""A causal language model as a stream of blocks: embed -> block 0 -> ... -> block L-1 -> head, each run alone.

:class:`DecoderStream` runs the model's own modules one at a time, so that only one block's weights need be in
memory (:class:`bitplan.sources.LazyModel` materializes it in place and drops it after). What every block
receives besides the hidden states (attention mask, rotary position embeddings, cache positions) is captured per
layer by running the model's own forward with each block replaced by a stand-in that records its arguments and
passes the hidden states through: the stream calls each block exactly as the whole model would.

:class:`Boundaries` keeps the hidden states between blocks, in memory up to a cap and beyond it in a memory-mapped
file, for the backward walk (:mod:`bitplan.sensitivity.streamed`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.sources.lazy import LazyModel
from bitplan.sources.units import find_block_stack
from bitplan.stages import ProgressFn, Stage

Hidden = torch.Tensor  # (batch, seq_len, hidden) float32


class StreamUnsupported(Exception):
    """The model's structure is not embed -> blocks -> norm -> head (an encoder, an unknown final norm): the
    caller runs the whole model instead."""


class _Reached(Exception):
    """Raised by the last stand-in block: nothing after the block stack is run while capturing."""


class _StandIn(nn.Module):
    """Records the arguments the model passes to block ``index`` and returns the hidden states unchanged."""

    def __init__(self, index: int, last: bool, record: Callable[[int, tuple[Any, ...], dict[str, Any]], None],
                 attention_type: str | None) -> None:
        super().__init__()
        self.index, self.last, self.record = index, last, record
        if attention_type is not None:
            self.attention_type = attention_type  # models that pick a mask per layer type read it from the layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.record(self.index, args, kwargs)
        if self.last:
            raise _Reached
        return args[0] if args else kwargs["hidden_states"]


class DecoderStream:
    """The blocks of a causal LM run one at a time, with the arguments the whole model would give them.

    Args:
        source: the lazy model (or a resident one) whose blocks are materialized one at a time.
        dtype: the dtype blocks compute in (default: the source's ``placement``; float32 is the reference, the
            stored bf16 then cast on load). A resident model computes in its own dtype.
        device: where each block and its windows compute (default: the source's ``placement``); what a block
            returns is float32 on that device, and :class:`Boundaries` keeps it on the host. A resident model
            computes where it lies.
    """

    def __init__(self, source: LazyModel, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        model = source.model
        if source.resident:
            first = next(model.parameters(), None)
            dtype = torch.float32 if first is None else first.dtype
            device = "cpu" if first is None else first.device
        placement = source.placement
        self.source, self.model = source, model
        self.dtype = placement.dtype if dtype is None else dtype
        self.device = torch.device(placement.device if device is None else device)
        self.stack_name, self.blocks = find_block_stack(model)
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        self.norm_name, self.norm = _final_norm(model, base)
        head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
        if not isinstance(head, nn.Linear):
            raise StreamUnsupported(f"{type(model).__name__} has no linear output head")
        self.head_module = head
        self.head_name = _name_of(model, head)
        self.embedding = model.get_input_embeddings()
        self.embedding_name = _name_of(model, self.embedding)
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        self._calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.stack_name}.{index}"

    def embed(self, tokens: torch.Tensor) -> Hidden:
        """The hidden states entering block 0 for ``tokens (batch, seq_len)``; the other arguments of every block
        are recorded for :meth:`run_block` (the same for every window of this shape)."""
        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def record(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            calls[index] = (tuple(args[1:]) if args else (), {k: v for k, v in kwargs.items()
                                                                if k != "hidden_states"})
            if index == 0:
                calls[-1] = ((args[0] if args else kwargs["hidden_states"]).detach(),), {}

        originals = list(self.blocks)
        for index, block in enumerate(originals):
            self.blocks[index] = _StandIn(index, index == len(originals) - 1, record,
                                          getattr(block, "attention_type", None))
        extra = {"use_cache": False} if getattr(self.model.config, "use_cache", None) is not None else {}
        try:
            with self.source.materialized(self.embedding_name, self.embedding, dtype=self.dtype,
                                          device=self.device), torch.no_grad():
                try:
                    self.model(tokens.to(self.device), **extra)
                except _Reached:
                    pass
        finally:
            for index, block in enumerate(originals):
                self.blocks[index] = block
        if len(calls) != len(originals) + 1:
            raise StreamUnsupported(f"{type(self.model).__name__} did not call each of its blocks once")
        hidden = calls.pop(-1)[0][0]
        self._calls = [calls[i] for i in range(len(originals))]
        return hidden.float()

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[Callable[[Hidden], Hidden]]:
        """Block ``index`` materialized, as a function of its input hidden states."""
        if not self._calls:
            raise RuntimeError("call embed() on a window first: the blocks' other arguments come from it")
        module = self.blocks[index]
        args, kwargs = self._calls[index]

        def run(hidden: Hidden) -> Hidden:
            output = module(hidden.to(self.device, self.dtype), *args, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            return output.float()

        with self.source.materialized(self.block_prefix(index), module, dtype=self.dtype, device=self.device):
            yield run

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[Hidden], torch.Tensor]]:
        """The final norm and the output head materialized, as ``hidden -> (batch, seq_len, vocab)`` float32
        logits (with the model's final soft-capping, when it has one)."""
        with self.source.materialized(self.norm_name, self.norm, dtype=self.dtype, device=self.device), \
                self.source.materialized(self.head_name, self.head_module, dtype=self.dtype, device=self.device):
            def run(hidden: Hidden) -> torch.Tensor:
                logits = self.head_module(self.norm(hidden.to(self.device, self.dtype))).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                return logits

            yield run

    def block_of(self, unit_name: str) -> int | None:
        """The block a unit (a qualified module name) lies in, or ``None``."""
        prefix = self.stack_name + "."
        return int(unit_name[len(prefix):].split(".")[0]) if unit_name.startswith(prefix) else None


def _final_norm(model: nn.Module, base: nn.Module | None) -> tuple[str, nn.Module]:
    for holder in (base, model):
        if holder is None:
            continue
        for attribute in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            module = getattr(holder, attribute, None)
            if isinstance(module, nn.Module):
                return _name_of(model, module), module
    raise StreamUnsupported(f"{type(model).__name__}: no final norm found after the block stack")


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise StreamUnsupported(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


class Boundaries:
    """Hidden states between blocks, by key: in memory up to ``cap_bytes``, then in memory-mapped files under a
    temporary folder (removed by :meth:`close`)."""

    def __init__(self, cap_bytes: int, *, spill_dir: Path | None = None) -> None:
        self.cap_bytes = cap_bytes
        self._spill_parent = spill_dir
        self._folder: Path | None = None
        self._held: dict[Any, torch.Tensor] = {}
        self.in_memory = 0
        self.spilled = 0

    def limit(self, cap_bytes: int) -> None:
        """Hold at most ``cap_bytes`` in memory from now on (the job's memory plan lowering the caller's cap)."""
        self.cap_bytes = min(self.cap_bytes, cap_bytes)

    def put(self, key: Any, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        old = self._held.pop(key, None)
        if old is not None and not _is_mapped(old):
            self.in_memory -= old.numel() * old.element_size()
        size = tensor.numel() * tensor.element_size()
        if self.in_memory + size <= self.cap_bytes:
            self._held[key] = tensor.clone() if tensor.device.type == "cpu" else tensor.cpu()
            self.in_memory += size
            return
        if old is not None and _is_mapped(old) and old.shape == tensor.shape and old.dtype == tensor.dtype:
            old.copy_(tensor)
            self._held[key] = old
            return
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="bitplan-boundaries-", dir=self._spill_parent))
        path = self._folder / f"{len(list(self._folder.iterdir()))}.bin"
        mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype)
        mapped = mapped.view(tensor.shape)
        mapped.copy_(tensor)
        mapped._bitplan_mapped = True  # type: ignore[attr-defined]
        self._held[key] = mapped
        self.spilled += size

    def get(self, key: Any) -> torch.Tensor:
        return self._held[key]

    def close(self) -> None:
        self._held.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> Boundaries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_mapped(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, "_bitplan_mapped", False))


def stream_forward(stream: DecoderStream, windows: Sequence[torch.Tensor], boundaries: Boundaries, *,
                   on_block: Callable[[int, Callable[[Hidden], Hidden]], None] | None = None,
                   on_progress: ProgressFn | None = None) -> None:
    """Every window through every block, block by block; ``boundaries`` gets ``(i, w)`` -> the input of block
    ``i`` for window ``w`` (``i = L`` the last block's output). ``on_block(i, run)`` is called with each block
    materialized, before its windows run (to hook its units); ``on_progress`` hears of each block done (stage
    ``calibration statistics``: every block costs the same, so its steps make an honest ETA)."""
    for w, tokens in enumerate(windows):
        boundaries.put((0, w), stream.embed(tokens))
    for index in range(stream.num_blocks):
        with stream.block(index) as run, torch.no_grad():
            if on_block is not None:
                on_block(index, run)
            for w in range(len(windows)):
                boundaries.put((index + 1, w), run(boundaries.get((index, w))))
        if on_progress is not None:
            on_progress(Stage.CALIBRATION_STATISTICS, index + 1, stream.num_blocks)


DEFAULT_BOUNDARY_BYTES = 2 << 30  # hidden states kept in memory between blocks; the rest spill to files


def streamed_pass(model: nn.Module | LazyModel, units: Any, *, loss_fn: Any, curvature_loss_fn: Any,
                  boundaries: Boundaries) -> Any:
    """The token pass's :class:`bitplan.sensitivity.streamed.StreamedModel` for ``model`` (a loaded model or a
    lazy one) with its losses' logits forms, or ``None`` where the model does not stream (an encoder, a unit
    outside the block stack such as a tied head, a loss with no logits form): the caller then runs the whole
    model."""
    from bitplan.sensitivity.streamed import StreamedModel
    from bitplan.sources.models import (
        causal_lm_loss,
        causal_lm_sampled_loss,
        sampled_loss_of_logits,
        text_loss_of_logits,
    )

    forms = {causal_lm_loss: text_loss_of_logits, causal_lm_sampled_loss: sampled_loss_of_logits, None: None}
    if loss_fn not in forms or curvature_loss_fn not in forms or loss_fn is None:
        return None
    lazy = model if isinstance(model, LazyModel) else resident_model(model)
    if lazy.placement.boundary_bytes is not None and isinstance(boundaries, Boundaries):
        boundaries.limit(lazy.placement.boundary_bytes)
    try:
        stream = DecoderStream(lazy)
    except (StreamUnsupported, ValueError):
        return None
    if any(stream.block_of(name) is None for name in units):
        return None
    return StreamedModel(stream=stream, boundaries=boundaries, loss=forms[loss_fn],
                         curvature_loss=forms[curvature_loss_fn])


def resident_model(model: nn.Module) -> LazyModel:
    """A model already in memory as a :class:`LazyModel` whose materializing changes nothing."""
    from bitplan.sources.tensors import LoadedTensors

    return LazyModel(model=model, store=LoadedTensors(model), tokenizer=None, kind=None, resident=True,
                     names={})


def stream_input_energy(stream: DecoderStream, units: Any, windows: Sequence[torch.Tensor],
                        boundaries: Boundaries, *, on_progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """:func:`bitplan.sensitivity.importance.input_energy` with the model streamed: per unit the ``(in_features,)``
    float32 sum over calibration tokens of its squared inputs, one block materialized at a time (the forward
    fills ``boundaries``; ``on_progress`` hears of each block, :func:`stream_forward`)."""
    energy = {name: torch.zeros(units[name].in_features, dtype=torch.float64) for name in units}
    handles: list[Any] = []

    def hook_block(index: int, run: Callable[[Hidden], Hidden]) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        for name in (n for n in units if stream.block_of(n) == index):
            def add(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor,
                    name: str = name) -> None:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
                energy[name] += x.double().pow(2).sum(dim=0).cpu()

            handles.append(units[name].register_forward_hook(add))

    try:
        stream_forward(stream, windows, boundaries, on_block=hook_block, on_progress=on_progress)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.float() for name, value in energy.items()}
