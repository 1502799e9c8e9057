"""One interface over the sensitivity metrics: a predicted loss increase per (unit, bit width)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
from torch import nn

from bitplan.quantizer.rtn import quantization_error
from bitplan.sensitivity.activations import (
    LossFn,
    ProgressFn,
    StopFn,
    UnitStatistics,
    check_stop,
    collect_unit_statistics,
)
from bitplan.sensitivity.blockwise import block_grams
from bitplan.sensitivity.hutchinson import (
    TraceEstimate,
    double_backward_hvp,
    estimate_traces,
    forward_over_reverse_hvp,
    gradient_difference_hvp,
    median_relative_error,
)
from bitplan.sensitivity.output_error import predict_output_error
from bitplan.sensitivity.token_fisher import DEFAULT_ERROR_BYTES, token_fisher
from bitplan.sensitivity.weight_metrics import predict_baq, predict_gwq, predict_slim_salience, salience
from bitplan.stages import Stage

logger = logging.getLogger(__name__)


class Metric(str, Enum):
    """Sensitivity metrics, as named on the command line."""

    OUTPUT_ERROR = "output_error"
    FISHER_OUTPUT_ERROR = "fisher_output_error"
    HUTCHINSON = "hutchinson"
    GWQ = "gwq"
    SLIM_SALIENCE = "slim_salience"
    BAQ = "baq"
    TOKEN_FISHER = "token_fisher"
    TOKEN_TAYLOR = "token_taylor"


NEEDS_LOSS = {Metric.FISHER_OUTPUT_ERROR, Metric.HUTCHINSON, Metric.GWQ, Metric.TOKEN_FISHER, Metric.TOKEN_TAYLOR}
USES_LOSS = NEEDS_LOSS | {Metric.SLIM_SALIENCE, Metric.BAQ}  # weighted by output-gradient energy when available


@dataclass(frozen=True)
class UnitSensitivity:
    """A unit's score (metric-specific: trace, Fisher energy, ...) and predicted loss increase per bit width."""

    name: str
    numel: int
    score: float
    delta_loss: dict[int, float]


@dataclass(frozen=True)
class SensitivityResult:
    """Per-unit sensitivities plus any warnings the caller should show."""

    metric: Metric
    units: tuple[UnitSensitivity, ...]
    seconds: float
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SensitivityResult:
        """Inverse of :meth:`to_json`."""
        return cls(metric=Metric(data["metric"]), seconds=float(data["seconds"]),
                   warnings=tuple(str(w) for w in data["warnings"]),
                   units=tuple(UnitSensitivity(name=u["name"], numel=int(u["numel"]), score=float(u["score"]),
                                               delta_loss={int(b): float(v) for b, v in u["delta_loss"].items()})
                               for u in data["units"]))

    def to_json(self) -> dict[str, object]:
        return {
            "metric": self.metric.value,
            "seconds": self.seconds,
            "warnings": list(self.warnings),
            "units": [
                {"name": u.name, "numel": u.numel, "score": u.score,
                 "delta_loss": {str(b): v for b, v in u.delta_loss.items()}}
                for u in self.units
            ],
        }


@dataclass(frozen=True)
class HutchinsonConfig:
    """Probe settings for the ``hutchinson`` metric."""

    min_probes: int = 4
    max_probes: int = 32
    rel_tol: float = 0.05  # of the summed trace
    # and every unit's trace positive with a median relative standard error of at most this (None: not checked)
    unit_rel_tol: float | None = 0.3
    seed: int = 0
    # "gradient_difference": central difference of two first-order gradients (SDPA attention, first-order memory;
    # 1.9x faster per probe than a PyHessian-style loop on SmolLM2, per-probe totals within 2e-4 of exact,
    # bench/results/sensitivity-hvp-smollm2-2026-11-24.json); "double_backward" (exact, eager attention);
    # "jvp" (forward over reverse; its loss_fn must work under torch.func)
    method: str = "gradient_difference"
    relative_step: float = 1e-3  # gradient_difference's step, relative to the rms of the unit weights

    def __post_init__(self) -> None:
        if self.method not in HVP_METHODS:
            raise ValueError(f"unknown Hessian-vector product method {self.method!r}; choose {HVP_METHODS}")


HVP_METHODS = ("double_backward", "jvp", "gradient_difference")
SECOND_ORDER_HVP_METHODS = ("double_backward", "jvp")  # need second-order autograd (eager attention on CPU)


class LossModule(nn.Module):
    """``loss_fn(model, batch)`` (mean per token) as a module, so that ``torch.func.functional_call`` can swap
    its weights."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, batch) / batch.numel()


def functional_loss(model: nn.Module, loss_fn: LossFn, names: Sequence[str], batch: torch.Tensor
                    ) -> Callable[[tuple[torch.Tensor, ...]], torch.Tensor]:
    """The mean token loss on ``batch`` as a function of the parameters ``names`` of ``model`` (for torch.func)."""
    wrapper = LossModule(model, loss_fn)
    keys = [f"model.{name}" for name in names]

    def loss_of(weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.func.functional_call(wrapper, dict(zip(keys, weights, strict=True)), (batch,))

    return loss_of


def taylor_increase(first_order: Mapping[int, float], second_order: Mapping[int, float],
                    first_order_std_error: Mapping[int, float] | None = None) -> dict[int, float]:
    """``first + second`` order loss change per bit width.

    The first-order term is an average over calibration batches; with its standard error ``se`` it is shrunk by
    ``max(0, 1 - se^2 / first^2)`` (positive-part James-Stein), so a slope that the calibration set cannot tell
    from zero adds nothing. The sum is then made non-increasing in the width from the wide end: a narrower grid
    is never predicted to cost less than a wider one, since the expansion is most accurate for the small errors
    of wide grids. The result can be negative: quantizing may lower the calibration loss of weights that were not
    trained on that text."""
    result = {}
    running = -math.inf
    for bits in sorted(second_order, reverse=True):
        first = first_order[bits]
        if first_order_std_error is not None and first != 0.0:
            first *= max(0.0, 1.0 - (first_order_std_error[bits] / first) ** 2)
        running = max(running, first + second_order[bits])
        result[bits] = running
    return dict(sorted(result.items()))


def _squared_rtn_error(weight: torch.Tensor, bits: int, group_size: int) -> float:
    return float(quantization_error(weight, bits=bits, group_size=group_size).pow(2).sum())


def _hutchinson(
    model: nn.Module, units: Mapping[str, nn.Linear], batches: Sequence[torch.Tensor], loss_fn: LossFn,
    *, bits_options: Sequence[int], group_size: int, config: HutchinsonConfig, on_progress: ProgressFn | None,
    should_stop: StopFn | None = None,
) -> tuple[list[UnitSensitivity], list[str]]:
    """HAWQ-V2: ``delta_loss(b) = 0.5 * tr(H_u) / numel_u * ||Q_b(W_u) - W_u||^2``."""
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    params = {name: m.weight for name, m in units.items()}
    batch = torch.cat(list(batches), dim=0)
    options = {"min_probes": config.min_probes, "max_probes": config.max_probes, "rel_tol": config.rel_tol,
               "unit_rel_tol": config.unit_rel_tol, "seed": config.seed, "on_progress": on_progress,
               "should_stop": should_stop}
    weights = list(params.values())
    try:
        if config.method == "jvp":  # torch.func differentiates the weights it is handed
            loss_of = functional_loss(model, loss_fn, [f"{name}.weight" for name in params], batch)
            hvp = forward_over_reverse_hvp(loss_of, weights)
        else:
            for weight in weights:
                weight.requires_grad_(True)
            if config.method == "gradient_difference":

                def gradient_at() -> list[torch.Tensor]:
                    return list(torch.autograd.grad(loss_fn(model, batch) / batch.numel(), weights))

                hvp = gradient_difference_hvp(gradient_at, weights, relative_step=config.relative_step)
            else:
                hvp = double_backward_hvp(loss_fn(model, batch) / batch.numel(), weights)
        traces: dict[str, TraceEstimate] = estimate_traces(hvp, params, **options)  # type: ignore[arg-type]
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
    warnings = []
    probes = len(next(iter(traces.values())).samples)
    negative = [n for n, t in traces.items() if t.trace < 0]
    if negative:
        warnings.append(f"{len(negative)} of {len(traces)} Hutchinson traces were negative after {probes} probes "
                        f"and were clamped to 0 (first: {negative[:3]}); raise max_probes for a tighter estimate")
    median = median_relative_error(list(traces.values()))
    if config.unit_rel_tol is not None and median > config.unit_rel_tol:
        warnings.append(f"after {probes} probes (max_probes) the median relative standard error of the per-unit "
                        f"Hessian traces is {median:.2f}, above unit_rel_tol {config.unit_rel_tol}; the ranking "
                        "of units is that uncertain")
    result = []
    for name, module in units.items():
        trace = max(traces[name].trace, 0.0)
        numel = module.weight.numel()
        delta = {b: 0.5 * trace / numel * _squared_rtn_error(module.weight, b, group_size) for b in bits_options}
        result.append(UnitSensitivity(name=name, numel=numel, score=traces[name].trace, delta_loss=delta))
    return result, warnings


def _predict(metric: Metric, weight: torch.Tensor, stats: UnitStatistics, *, bits_options: Sequence[int],
             group_size: int) -> dict[int, float]:
    if metric in (Metric.OUTPUT_ERROR, Metric.FISHER_OUTPUT_ERROR):
        return predict_output_error(weight, stats, bits_options=bits_options, group_size=group_size,
                                    fisher=metric is Metric.FISHER_OUTPUT_ERROR)
    predictor = {Metric.GWQ: predict_gwq, Metric.SLIM_SALIENCE: predict_slim_salience, Metric.BAQ: predict_baq}
    return predictor[metric](weight, stats, bits_options=bits_options, group_size=group_size)


def _score(metric: Metric, weight: torch.Tensor, stats: UnitStatistics) -> float:
    """The metric's own per-unit number: output-gradient energy, input energy, weight Fisher or salience."""
    tokens = max(stats.tokens, 1)
    if metric is Metric.GWQ and stats.weight_grad_sq is not None:
        return float(stats.weight_grad_sq.sum()) / tokens
    if metric is Metric.SLIM_SALIENCE:
        return float(salience(weight, stats).mean())
    if stats.output_grad_sq is not None:
        return float(stats.output_grad_sq.sum()) / tokens
    return float(torch.diagonal(stats.gram).sum()) / tokens


def _unit_statistics(
    model: nn.Module, units: Mapping[str, nn.Linear], batches: Sequence[torch.Tensor], *, metric: Metric,
    loss_fn: LossFn | None, blocks: tuple[str, nn.ModuleList] | None, on_progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> Iterator[dict[str, UnitStatistics]]:
    """The calibration statistics ``metric`` needs, in pieces the caller consumes and drops.

    With ``blocks``, the Gram matrices are collected block by block (:func:`sensitivity.blockwise.block_grams`):
    a backward pass first gathers the small per-unit gradient statistics, then one forward pass per block adds
    that block's Grams, so only one block's Grams are ever held. Without it, one pass gathers everything.
    """
    loss = loss_fn if metric in USES_LOSS else None
    weight_grads = metric is Metric.GWQ
    if blocks is None or weight_grads:  # GWQ needs no Grams; its weight-gradient statistics are model-sized
        yield collect_unit_statistics(model, units, batches, loss_fn=loss, on_progress=on_progress,
                                      should_stop=should_stop, weight_grads=weight_grads, grams=not weight_grads)
        return
    gradients = None
    if loss is not None:
        gradients = collect_unit_statistics(model, units, batches, loss_fn=loss, on_progress=on_progress,
                                            should_stop=should_stop, grams=False)
    for block in block_grams(model, blocks, units, batches, on_progress=on_progress, should_stop=should_stop):
        if gradients is not None:
            block = {name: replace(gradients.pop(name), gram=entry.gram) for name, entry in block.items()}
        yield block


def compute_sensitivity(
    model: nn.Module,
    units: Mapping[str, nn.Linear],
    batches: Sequence[torch.Tensor],
    *,
    metric: Metric,
    bits_options: Sequence[int],
    group_size: int,
    loss_fn: LossFn | None = None,
    hutchinson: HutchinsonConfig | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    blocks: tuple[str, nn.ModuleList] | None = None,
    max_error_bytes: int = DEFAULT_ERROR_BYTES,
) -> SensitivityResult:
    """Predicted loss increase of RTN-quantizing each unit at each bit width.

    Args:
        units: qualified name -> ``nn.Linear`` inside ``model``.
        batches: calibration token ids, each ``(batch, seq_len)`` int64.
        loss_fn: summed token loss ``loss_fn(model, batch)``; required by ``fisher_output_error`` and
            ``hutchinson``.
        should_stop: checked between batches, probes and units; ``Cancelled`` is raised when it returns true.
        blocks: the model's transformer blocks (``bitplan.units.find_block_stack``), which ``units`` lie in:
            the Gram-based metrics then hold one block's input Grams at a time.
        max_error_bytes: the RTN-error copies ``token_fisher``/``token_taylor`` may hold at once; fewer means
            more backward passes over the calibration set (:func:`sensitivity.token_fisher.token_fisher`).
    """
    started = time.perf_counter()
    if metric in NEEDS_LOSS and loss_fn is None:
        raise ValueError(f"metric {metric.value!r} needs a loss (a causal language model); use 'output_error'")
    warnings: list[str] = []
    if metric in (Metric.TOKEN_FISHER, Metric.TOKEN_TAYLOR):
        assert loss_fn is not None
        terms = token_fisher(model, units, batches, loss_fn=loss_fn, bits_options=bits_options,
                             group_size=group_size, max_error_bytes=max_error_bytes,
                             blocks=None if blocks is None else blocks[1], on_progress=on_progress,
                             should_stop=should_stop)
        entries = [UnitSensitivity(name=name, numel=module.weight.numel(), score=terms.energy[name],
                                   delta_loss=(taylor_increase(terms.first_order[name], terms.second_order[name],
                                                               terms.first_order_std_error[name])
                                               if metric is Metric.TOKEN_TAYLOR else terms.second_order[name]))
                   for name, module in units.items()]
    elif metric is Metric.HUTCHINSON:
        assert loss_fn is not None
        entries, warnings = _hutchinson(model, units, batches, loss_fn, bits_options=bits_options,
                                        group_size=group_size, config=hutchinson or HutchinsonConfig(),
                                        on_progress=on_progress, should_stop=should_stop)
    else:
        by_name = {}
        for stats in _unit_statistics(model, units, batches, metric=metric, loss_fn=loss_fn, blocks=blocks,
                                      on_progress=on_progress, should_stop=should_stop):
            for name, entry in stats.items():
                check_stop(should_stop, "predicted error")
                weight = units[name].weight
                delta = _predict(metric, weight, entry, bits_options=bits_options, group_size=group_size)
                by_name[name] = UnitSensitivity(name=name, numel=weight.numel(), score=_score(metric, weight, entry),
                                                delta_loss=delta)
                if on_progress is not None:
                    on_progress(Stage.PREDICTED_ERROR, len(by_name), len(units))
        entries = [by_name[name] for name in units]
    for warning in warnings:
        logger.warning(warning)
    return SensitivityResult(metric=metric, units=tuple(entries), seconds=time.perf_counter() - started,
                             warnings=tuple(warnings))


