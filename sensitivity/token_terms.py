"""The sums behind the token metrics' terms: the per-token products ``g_t . dW x_t`` of a unit's output gradient
``g_t``, its weight errors ``dW`` and its input ``x_t``, fed by hooks during backward passes
(:func:`sensitivity.token_fisher.token_fisher`, :func:`sensitivity.streamed.streamed_token_fisher`), and the
terms they give (:class:`TokenFisherTerms`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitplan.sensitivity.request import Key


@dataclass(frozen=True)
class TokenFisherTerms:
    """Per unit and bit width, the two Taylor terms of the loss increase, and each unit's output-gradient energy
    per token."""

    second_order: dict[str, dict[Any, float]]  # keyed by bit width, or by option key (a format name)
    first_order: dict[str, dict[Any, float]]
    first_order_std_error: dict[str, dict[Any, float]]  # over calibration batches (inf with a single batch)
    energy: dict[str, float]


def projected_errors(g: torch.Tensor, deltas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(options, tokens)`` float32 scalars ``g_t . dW_b x_t`` for every option ``b`` at once: ``g (T, O)``,
    ``deltas (B, O, I)``, ``x (T, I)``. The product goes through the narrower side: ``x dW^T`` as one matrix
    product when ``O <= I`` (a ``T x B*O`` intermediate), ``g dW`` otherwise (``B x T x I``). With bfloat16
    ``deltas`` (:func:`sensitivity.token_fisher.projection_dtype`) both products run in bfloat16 with float32
    sums, the second as a product batched over tokens (30% faster than a float32 multiply and sum on SmolLM2's
    ``down_proj``)."""
    options, out_features, in_features = deltas.shape
    low = deltas.dtype
    if low != torch.float32:  # both products in bfloat16 (float32 sums): the last one batched over tokens
        if out_features <= in_features:
            flat = deltas.reshape(options * out_features, in_features)
            through = (x.to(low) @ flat.T).view(-1, options, out_features)
            return torch.bmm(through, g.to(low)[:, :, None])[:, :, 0].T.float()
        through = torch.matmul(g.to(low), deltas).transpose(0, 1)  # (T, B, I)
        return torch.bmm(through, x.to(low)[:, :, None])[:, :, 0].T.float()
    if out_features <= in_features:
        through = (x @ deltas.reshape(options * out_features, in_features).T).view(-1, options, out_features)
        return (through * g[:, None, :]).sum(dim=2).T
    return (torch.matmul(g, deltas) * x[None]).sum(dim=2)  # a batched product, 1.5x einsum's speed


class TermAccumulator:
    """The sums behind :class:`TokenFisherTerms`, fed by hooks on the units during backward passes.

    ``deltas`` holds the current chunk's weight errors ``(options, out, in)`` per unit; :meth:`make_hook` gives a
    unit's forward hook, whose output-gradient hook adds that use's per-token scalars ``g_t . dW x_t`` (in a
    pass that feeds the second-order term) and their first-order sum (in a pass that feeds the slope);
    ``phase`` says which terms the current backward pass feeds. :meth:`end_batch` closes a calibration batch
    (squares its per-token scalars, keeps its first-order sum for the standard error); :meth:`result` divides.
    """

    def __init__(self, keys: Mapping[str, list[Key]], units: Mapping[str, nn.Module], *,
                 skip_first_position: bool = False) -> None:
        self.keys = keys
        self.skip_first_position = skip_first_position
        self.squares = {name: torch.zeros(len(keys[name]), dtype=torch.float64) for name in units}
        self.sums = {name: torch.zeros(len(keys[name]), dtype=torch.float64) for name in units}
        self.batch_sums_sq = {name: torch.zeros(len(keys[name]), dtype=torch.float64) for name in units}
        self.energy = dict.fromkeys(units, 0.0)
        self.deltas: dict[str, torch.Tensor] = {}
        self.pending: dict[str, torch.Tensor] = {}  # per unit: this batch's (options, sequences, positions) scalars
        self.firsts: dict[str, torch.Tensor] = {}  # per unit: this batch's first-order sums (options,), all uses
        self.phase = {"slope": True, "curvature": True}  # which terms the current backward pass feeds

    def add(self, name: str, scalars: torch.Tensor | None, first: torch.Tensor | None = None) -> None:
        """One use's per-token scalars, and its first-order sum when not theirs (the bfloat16 path's, from the
        weight gradient: a sum over tokens cancels, and the rounding of each token's scalar would not); each only
        in a pass that feeds its term."""
        if self.phase["curvature"] and scalars is not None:
            pending = self.pending
            pending[name] = scalars.double() if name not in pending else pending[name] + scalars.double()
        if self.phase["slope"]:
            first = scalars.flatten(1).sum(dim=1, dtype=torch.float64) if first is None else first.double()
            self.firsts[name] = first if name not in self.firsts else self.firsts[name] + first

    def add_output_gradient(self, name: str, grad: torch.Tensor, x: torch.Tensor) -> None:
        """A unit's output gradient ``grad (..., out)`` and input ``x (..., in)`` in one backward pass."""
        deltas = self.deltas[name]
        g = grad.detach().float().reshape(-1, grad.shape[-1])
        inputs_ = x.float().reshape(-1, x.shape[-1])
        curvature = self.phase["curvature"]
        scalars = (projected_errors(g, deltas, inputs_).reshape(-1, *grad.shape[:-1]) if curvature else None)
        first = None
        low = deltas.dtype
        if self.phase["slope"] and (low != torch.float32 or scalars is None):
            # sum_t g_t . dW x_t = <dW, sum_t g_t x_t^T>, with float32 sums
            gradient = (g.to(low).T @ inputs_.to(low)).reshape(-1, 1)
            first = (deltas.flatten(1) @ gradient).float()[:, 0]
        self.add(name, scalars, first)
        if curvature:
            self.energy[name] += float(g.pow(2).sum())

    def make_hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        """A forward hook on unit ``name`` that feeds its output gradient to :meth:`add_output_gradient`."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()
            output.register_hook(lambda grad: self.add_output_gradient(name, grad, x))

        return hook

    def end_batch(self, names: Sequence[str]) -> None:
        """Close a calibration batch for ``names``: square its per-token scalars, keep its first-order sum."""
        for name in names:
            scalars = self.pending.pop(name, None)
            if scalars is not None:  # (options, sequences, positions)
                squared = scalars[..., 1:] if self.skip_first_position else scalars
                self.squares[name] += squared.pow(2).flatten(1).sum(dim=1)
            batch_sum = self.firsts.pop(name, None)
            if batch_sum is not None:
                self.sums[name] += batch_sum
                self.batch_sums_sq[name] += batch_sum.pow(2)

    def result(self, *, tokens: int, curved_tokens: int, batches: int) -> TokenFisherTerms:
        """The terms: second order and energy per curvature token, first order per token, its standard error
        from the spread of the ``batches`` per-batch sums."""
        tokens, curved_tokens = max(tokens, 1), max(curved_tokens, 1)

        def std_error(name: str, index: int) -> float:
            if batches < 2:
                return math.inf
            mean = float(self.sums[name][index]) / batches
            variance = max(float(self.batch_sums_sq[name][index]) / batches - mean * mean, 0.0) * batches / (
                batches - 1)
            return math.sqrt(batches * variance) / tokens

        keys = self.keys
        return TokenFisherTerms(
            second_order={name: {b: 0.5 * float(self.squares[name][i]) / curved_tokens
                                 for i, b in enumerate(keys[name])} for name in self.squares},
            first_order={name: {b: float(self.sums[name][i]) / tokens for i, b in enumerate(keys[name])}
                         for name in self.sums},
            first_order_std_error={name: {b: std_error(name, i) for i, b in enumerate(keys[name])}
                                   for name in self.sums},
            energy={name: value / curved_tokens for name, value in self.energy.items()})
