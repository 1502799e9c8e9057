"""The registry of sensitivity metrics: each is a name, what it needs from the calibration pass, and a function
from :class:`MetricInputs` to per-unit predictions. Adding a metric is one function plus one
:func:`register_metric` line (and its name in ``sensitivity.request.Metric``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bitplan.sensitivity.activations import LossFn, ProgressFn, StopFn
from bitplan.sensitivity.request import SensitivityRequest

if TYPE_CHECKING:
    from bitplan.sensitivity.streamed import StreamedModel


@dataclass(frozen=True)
class MetricInputs:
    """Everything a metric may use: the request (its settings), and what the pass runs on (the model, its units,
    the calibration batches, the losses, the block stack, the callbacks)."""

    model: nn.Module
    units: Mapping[str, nn.Linear]
    batches: Sequence[torch.Tensor]
    request: SensitivityRequest
    loss_fn: LossFn | None = None
    curvature_loss_fn: LossFn | None = None  # a metric's second-order term's loss, when not ``loss_fn``
    blocks: tuple[str, nn.ModuleList] | None = None
    stream: StreamedModel | None = None  # the token pass then runs block by block
    on_progress: ProgressFn | None = None
    should_stop: StopFn | None = None


ComputeFn = Callable[[MetricInputs], "tuple[list[Any], list[str]]"]  # -> (UnitSensitivity per unit, warnings)


@dataclass(frozen=True)
class MetricEntry:
    """A registered metric. ``needs_loss``: only for models with a loss (causal LMs); ``uses_loss``: weighted by
    output gradients when a loss is there; ``weight_grads``: needs batch gradients of the weights."""

    name: str
    needs_loss: bool
    uses_loss: bool
    weight_grads: bool
    compute: ComputeFn
    takes_errors: bool = False  # predicts from any weight error (``SensitivityRequest.options`` / ``error_of``)
    model_labels: bool = False  # its loss takes labels drawn from the model's own outputs, not the text's
    model_curvature: bool = False  # its second-order term takes such labels; its first-order term the text's
    token_pass: bool = False  # computed by the per-token pass (``token_fisher``), in the job's projection dtype


METRICS: dict[str, MetricEntry] = {}


def register_metric(name: str, *, needs_loss: bool, uses_loss: bool | None = None, weight_grads: bool = False,
                    takes_errors: bool = False, model_labels: bool = False, model_curvature: bool = False,
                    token_pass: bool = False) -> Callable[[ComputeFn], ComputeFn]:
    """Register ``compute`` as the metric ``name``."""

    def add(compute: ComputeFn) -> ComputeFn:
        METRICS[name] = MetricEntry(name=name, needs_loss=needs_loss,
                                    uses_loss=needs_loss if uses_loss is None else uses_loss,
                                    weight_grads=weight_grads, compute=compute, takes_errors=takes_errors,
                                    model_labels=model_labels, model_curvature=model_curvature,
                                    token_pass=token_pass)
        return compute

    return add
