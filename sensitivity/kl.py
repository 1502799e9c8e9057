"""End-to-end KL divergence of a language model's next-token distribution after quantization.

Not a per-unit predictor: it measures a whole allocation at once, interactions between units included (what no
per-unit anchor sees), so a report can say what a chosen allocation costs, a caller can compare allocations, and
:func:`kl_contributions` can tell how much of it each group of units carries, to re-solve with that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def swapped_weights(units: Mapping[str, nn.Linear], replacements: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Give each unit named in ``replacements`` that weight for the duration; the originals come back after."""
    originals = {name: units[name].weight.data for name in replacements}
    try:
        for name, weight in replacements.items():
            units[name].weight.data = weight.to(originals[name].dtype)
        yield
    finally:
        for name, weight in originals.items():
            units[name].weight.data = weight


def per_token_kl(reference: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(reference || logprobs)`` at every position: log-probabilities ``(..., vocab)`` -> ``(...)``."""
    return (reference.exp() * (reference - logprobs)).sum(dim=-1)


def _token_kl(model: nn.Module, batch: torch.Tensor, reference: torch.Tensor) -> float:
    """Summed per-token ``KL(reference || model)`` on ``batch`` (reference: float log-probabilities)."""
    logprobs = torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
    return float(per_token_kl(reference, logprobs).sum())


@torch.no_grad()
def output_kl(model: nn.Module, units: Mapping[str, nn.Linear], replacements: Mapping[str, torch.Tensor],
              batches: Sequence[torch.Tensor]) -> float:
    """Mean per-token ``KL(p_float || p_quantized)`` (nats) over ``batches`` of token ids, with each unit named in
    ``replacements`` given that weight; the float weights are restored afterwards."""
    total, count = 0.0, 0
    for batch in batches:
        reference = torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
        with swapped_weights(units, replacements):
            total += _token_kl(model, batch, reference)
        count += batch.numel()
    return total / max(count, 1)


@torch.no_grad()
def kl_contributions(model: nn.Module, units: Mapping[str, nn.Linear], replacements: Mapping[str, torch.Tensor],
                     groups: Mapping[str, Sequence[str]], batches: Sequence[torch.Tensor],
                     on_group: Callable[[], None] | None = None) -> tuple[float, dict[str, float]]:
    """The mean per-token KL with every replacement in place, and for each group of unit names the part of it
    that goes away when that group alone keeps its float weights, ``KL(all) - KL(all but the group)``: the
    group's cost in the company of every other quantized unit (which a per-unit prediction cannot see). One
    window's log-probabilities are held at a time; ``on_group`` is called after each group of each window."""
    originals = {name: units[name].weight.data for name in replacements}
    total = 0.0
    without = dict.fromkeys(groups, 0.0)
    count = 0
    for batch in batches:
        reference = torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
        with swapped_weights(units, replacements):
            total += _token_kl(model, batch, reference)
            for group, names in groups.items():
                with swapped_weights(units, {name: originals[name] for name in names if name in originals}):
                    without[group] += _token_kl(model, batch, reference)
                if on_group is not None:
                    on_group()
        count += batch.numel()
    count = max(count, 1)
    return total / count, {group: (total - value) / count for group, value in without.items()}
