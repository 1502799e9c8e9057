"""Calibration statistics per unit, gathered in one pass: input Gram matrices and output-gradient energy."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitplan.stages import Stage

ProgressFn = Callable[[str, int, int], None]
LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
StopFn = Callable[[], bool]


class Cancelled(Exception):
    """Raised between layers, batches or probes when the caller's ``should_stop`` returns true."""


def check_stop(should_stop: StopFn | None, where: str) -> None:
    """Raise :class:`Cancelled` when ``should_stop`` says so."""
    if should_stop is not None and should_stop():
        raise Cancelled(f"cancelled during {where}")


@dataclass
class UnitStatistics:
    """What a unit saw during calibration.

    Attributes:
        gram: ``(in_features, in_features)`` float32, ``H = sum_t x_t x_t^T`` over calibration tokens.
        tokens: number of tokens ``N`` summed into ``gram``.
        output_grad_sq: ``(out_features,)`` float32, ``sum_t (dL_t/dy_{t,o})^2`` (empirical Fisher diagonal
            of the layer output), or ``None`` when no loss was given.
        weight_grad_sq: ``(out_features, in_features)``, ``sum_b (dL_b/dW)^2`` over batches ``b`` of the summed
            loss (GWQ's gradient statistics), when asked for.
        weight_grad_abs: ``(out_features, in_features)``, ``sum_b |dL_b/dW|`` (for GWQ's outlier map).
        batches: number of batches summed into the weight-gradient statistics.
    """

    gram: torch.Tensor
    tokens: int
    output_grad_sq: torch.Tensor | None = None
    weight_grad_sq: torch.Tensor | None = None
    weight_grad_abs: torch.Tensor | None = None
    batches: int = 0


SharedGrams = dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]]


def add_input_gram(entry: UnitStatistics, x: torch.Tensor, shared: SharedGrams) -> None:
    """Add ``x^T x`` of a unit's input to ``entry.gram``. Units fed the same tensor (q/k/v, gate/up) share one
    product through ``shared`` (cleared per batch); the input is kept alive beside its product so that its address
    cannot be reused by another tensor within the batch."""
    key = (x.data_ptr(), tuple(x.shape))
    if key not in shared:
        flat = x.reshape(-1, x.shape[-1]).float()
        shared[key] = (x, flat.T @ flat)
    entry.gram += shared[key][1]


Hook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]


def _empty_statistics(units: Mapping[str, nn.Linear], *, grams: bool, output_grads: bool,
                      weight_grads: bool) -> dict[str, UnitStatistics]:
    """Zeroed :class:`UnitStatistics` for every unit, with the tensors that the options ask for."""
    return {
        name: UnitStatistics(
            gram=torch.zeros(m.in_features, m.in_features) if grams else torch.empty(0),
            tokens=0,
            output_grad_sq=torch.zeros(m.out_features) if output_grads else None,
            weight_grad_sq=torch.zeros(m.out_features, m.in_features) if weight_grads else None,
            weight_grad_abs=torch.zeros(m.out_features, m.in_features) if weight_grads else None,
        )
        for name, m in units.items()
    }


def _statistics_hook(entry: UnitStatistics, grams: bool, batch_grams: SharedGrams) -> Hook:
    """A forward hook adding a unit's input Gram, tokens and (on backward) output-gradient energy to ``entry``."""
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach()
        if grams:
            add_input_gram(entry, x, batch_grams)
        entry.tokens += x.numel() // x.shape[-1]
        if entry.output_grad_sq is not None and output.requires_grad:
            grad_sq = entry.output_grad_sq

            def grad_hook(grad: torch.Tensor) -> None:
                grad_sq.add_(grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(dim=0))

            output.register_hook(grad_hook)

    return hook


def _run_batch(model: nn.Module, batch: torch.Tensor, loss_fn: LossFn | None) -> None:
    """A forward pass without a loss, else the loss's forward and backward."""
    if loss_fn is None:
        with torch.no_grad():
            model(batch)
    else:
        loss_fn(model, batch).backward()


def _add_weight_grads(stats: dict[str, UnitStatistics], weights: Mapping[str, nn.Parameter]) -> None:
    """Add the squared and absolute gradient of every unit's weight to its statistics, and clear the gradient."""
    for name, weight in weights.items():
        grad = weight.grad.detach().float()
        stats[name].weight_grad_sq.add_(grad * grad)  # type: ignore[union-attr]
        stats[name].weight_grad_abs.add_(grad.abs())  # type: ignore[union-attr]
        stats[name].batches += 1
        weight.grad = None


def _restore(model_flags: Mapping[nn.Parameter, bool], weights: Mapping[str, nn.Parameter],
             handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Clear the weights' gradients, remove the hooks and give every parameter back its ``requires_grad``."""
    for weight in weights.values():
        weight.grad = None
    for handle in handles:
        handle.remove()
    for parameter, flag in model_flags.items():
        parameter.requires_grad_(flag)


def collect_unit_statistics(
    model: nn.Module,
    units: Mapping[str, nn.Linear],
    batches: Sequence[torch.Tensor],
    *,
    loss_fn: LossFn | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    weight_grads: bool = False,
    grams: bool = True,
) -> dict[str, UnitStatistics]:
    """Run the calibration batches once and accumulate :class:`UnitStatistics` for every unit.

    Args:
        units: qualified name -> linear module inside ``model``.
        batches: token id tensors ``(batch, seq_len)`` int64.
        loss_fn: ``loss_fn(model, batch)`` returning the summed token loss with a graph to the unit outputs;
            when given, a backward pass also accumulates ``output_grad_sq``.
        should_stop: checked before every batch; :class:`Cancelled` is raised when it returns true.
        weight_grads: also accumulate the squared and absolute weight gradient of every batch's loss (needs
            ``loss_fn``; two tensors the size of each weight).
        grams: accumulate the input Gram matrices; without them ``gram`` is an empty tensor (for callers that
            collect the Grams block by block, :mod:`sensitivity.blockwise`).
    """
    if weight_grads and loss_fn is None:
        raise ValueError("weight-gradient statistics need a loss function")
    stats = _empty_statistics(units, grams=grams, output_grads=loss_fn is not None, weight_grads=weight_grads)
    batch_grams: SharedGrams = {}
    handles = [module.register_forward_hook(_statistics_hook(stats[name], grams, batch_grams))
               for name, module in units.items()]
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    weights = {name: module.weight for name, module in units.items()}
    if weight_grads:
        for weight in weights.values():
            weight.requires_grad_(True)
    try:
        for index, batch in enumerate(batches):
            check_stop(should_stop, "calibration statistics")
            batch_grams.clear()
            _run_batch(model, batch, loss_fn)
            if weight_grads:
                _add_weight_grads(stats, weights)
            if on_progress is not None:
                on_progress(Stage.CALIBRATION_STATISTICS, index + 1, len(batches))
    finally:
        batch_grams.clear()
        _restore(requires_grad, weights, handles)
    return stats
