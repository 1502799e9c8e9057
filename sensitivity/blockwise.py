"""Calibration activations block by block, as GPTQ collects them: the model runs up to its first transformer
block once, then each block runs over the whole calibration set with only its own units hooked, and its outputs
become the next block's inputs. Memory is the model, the calibration set's hidden states and one block's
statistics, instead of every unit's statistics at once (for a 7B Llama: ~0.9 GB of Grams per block against
~28 GB for all 32 blocks).

Forward-only: statistics that need the loss gradient (output-gradient energy) come from the backward pass in
:mod:`sensitivity.activations`, which keeps only small per-unit vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitplan.sensitivity.activations import ProgressFn, SharedGrams, StopFn, UnitStatistics, add_input_gram, check_stop
from bitplan.stages import Stage


class _ReachedFirstBlock(Exception):
    """Raised by the capture hook: nothing after the first block's input is needed."""


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering the current block, and the other arguments the model
    passes to every block (attention mask, rotary position embeddings, ...)."""

    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]

    def run(self, block: nn.Module, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """``block`` applied to ``hidden`` with batch ``position``'s other arguments; its hidden-state output."""
        output = block(hidden, *self.args[position], **self.kwargs[position])
        return output[0] if isinstance(output, tuple) else output


def capture_first_block_inputs(model: nn.Module, stack: nn.ModuleList, batches: Sequence[torch.Tensor]
                               ) -> BlockInputs:
    """Run the model on every batch only as far as the first block and keep what that block receives."""
    inputs = BlockInputs(hidden=[], args=[], kwargs=[])

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for cache_argument in ("past_key_values", "past_key_value"):  # no state may carry across batches
            if cache_argument in kwargs:
                kwargs[cache_argument] = None
        inputs.hidden.append(hidden.detach())
        inputs.args.append(tuple(args[1:]))
        inputs.kwargs.append(kwargs)
        raise _ReachedFirstBlock

    handle = stack[0].register_forward_pre_hook(capture, with_kwargs=True)
    extra = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch, **extra)
                except _ReachedFirstBlock:
                    pass
    finally:
        handle.remove()
    if len(inputs.hidden) != len(batches):
        raise RuntimeError(f"{type(model).__name__} did not call its first block for every calibration batch")
    return inputs


def block_grams(
    model: nn.Module,
    blocks: tuple[str, nn.ModuleList],
    units: Mapping[str, nn.Linear],
    batches: Sequence[torch.Tensor],
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Iterator[dict[str, UnitStatistics]]:
    """Yield, block after block, the input Gram matrix ``sum_t x_t x_t^T`` and token count of that block's units.

    Args:
        blocks: the qualified name and the ``nn.ModuleList`` of the model's transformer blocks, which the model
            applies one after the other (``bitplan.sources.units.find_block_stack``).
        units: qualified name -> linear module inside those blocks.

    The caller should consume (and drop) each block's statistics before asking for the next. Blocks without
    units in ``units`` are still run (their outputs feed the next block) but yield nothing.
    """
    stack_name, stack = blocks
    inputs = capture_first_block_inputs(model, stack, batches)
    for index, block in enumerate(stack):
        check_stop(should_stop, "calibration statistics")
        prefix = f"{stack_name}.{index}."
        own = {name: module for name, module in units.items() if name.startswith(prefix)}
        stats = {name: UnitStatistics(gram=torch.zeros(m.in_features, m.in_features), tokens=0)
                 for name, m in own.items()}
        shared: SharedGrams = {}
        handles = [module.register_forward_hook(_gram_hook(stats[name], shared)) for name, module in own.items()]
        try:
            with torch.no_grad():
                for position, hidden in enumerate(inputs.hidden):
                    shared.clear()
                    inputs.hidden[position] = inputs.run(block, position, hidden)
        finally:
            for handle in handles:
                handle.remove()
        if on_progress is not None:
            on_progress(Stage.BLOCK_STATISTICS, index + 1, len(stack))
        if stats:
            yield stats


def _gram_hook(entry: UnitStatistics, shared: SharedGrams
               ) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach()
        add_input_gram(entry, x, shared)
        entry.tokens += x.numel() // x.shape[-1]

    return hook
