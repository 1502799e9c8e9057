"""One interface over the sensitivity metrics: a predicted loss increase per (unit, bit width)."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
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
from bitplan.sensitivity.registry import METRICS, ComputeFn, MetricInputs, register_metric
from bitplan.sensitivity.request import Metric, SensitivityRequest
from bitplan.sensitivity.streamed import StreamedModel, streamed_token_fisher
from bitplan.sensitivity.token_fisher import token_fisher
from bitplan.sensitivity.weight_metrics import predict_baq, predict_gwq, predict_slim_salience, salience
from bitplan.stages import Stage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitSensitivity:
    """A unit's score (metric-specific: trace, Fisher energy, ...) and predicted loss increase per bit width."""

    name: str
    numel: int
    score: float
    delta_loss: dict[Any, float]  # keyed by bit width, or by format name when the pass was given options


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
                                               delta_loss={_key(b): float(v) for b, v in u["delta_loss"].items()})
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


def _key(text: str) -> int | str:
    """A JSON key back to a bit width (digits) or a format name."""
    return int(text) if text.isdigit() else text


CURVATURE_STRIDE = 2  # token_taylor_kl: the model-label pass on every other calibration window (job cost, see README)
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


def taylor_increase(first_order: Mapping[Any, float], second_order: Mapping[Any, float],
                    first_order_std_error: Mapping[Any, float] | None = None, *, monotone: bool = True,
                    signed: bool = False) -> dict[Any, float]:
    """``first + second`` order loss change per bit width.

    The first-order term is an average over calibration batches; with its standard error ``se`` it is shrunk by
    ``max(0, 1 - se^2 / first^2)`` (positive-part James-Stein), so a slope that the calibration set cannot tell
    from zero adds nothing. The sum is then made non-increasing in the width from the wide end: a narrower grid
    is never predicted to cost less than a wider one, since the expansion is most accurate for the small errors
    of wide grids. The result can be negative: quantizing may lower the calibration loss of weights that were not
    trained on that text. ``monotone=False`` (options that are formats, not widths of one grid) replaces the
    ordering step: there a negative first-order term counts as 0, so no format is predicted better than the
    float weights and an exact format (error 0: a GGUF source in its own type) is never passed over for a
    coarser one whose slope on the calibration text merely looks helpful (on SmolLM2, 35 layers stayed Q4_0 at
    5.6 bits per weight with the exact Q4_1 available, bench/results/peers-*). ``signed=True`` (with
    ``monotone=False``) keeps each option's own ``first + second``, sign and all: the prediction of the loss change
    itself, which ``bench/format_spearman.py`` scores beside the allocation's rule."""
    result = {}
    running = -math.inf
    for bits in (sorted(second_order, reverse=True) if monotone else second_order):
        first = first_order[bits]
        if first_order_std_error is not None and first != 0.0:
            first *= max(0.0, 1.0 - (first_order_std_error[bits] / first) ** 2)
        running = (max(running, first + second_order[bits]) if monotone else
                   (first if signed else max(first, 0.0)) + second_order[bits])
        result[bits] = running
    return dict(sorted(result.items())) if monotone else result


def _squared_rtn_error(weight: torch.Tensor, bits: int, group_size: int) -> float:
    return float(quantization_error(weight, bits=bits, group_size=group_size).pow(2).sum())


def _hutchinson(inputs: MetricInputs) -> tuple[list[UnitSensitivity], list[str]]:
    """HAWQ-V2: ``delta_loss(b) = 0.5 * tr(H_u) / numel_u * ||Q_b(W_u) - W_u||^2`` (or of each option's error)."""
    model, units, loss_fn, request = inputs.model, inputs.units, inputs.loss_fn, inputs.request
    config = request.hutchinson
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    params = {name: m.weight for name, m in units.items()}
    batch = torch.cat(list(inputs.batches), dim=0)
    probing = {"min_probes": config.min_probes, "max_probes": config.max_probes, "rel_tol": config.rel_tol,
               "unit_rel_tol": config.unit_rel_tol, "seed": config.seed, "on_progress": inputs.on_progress,
               "should_stop": inputs.should_stop}
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
        traces: dict[str, TraceEstimate] = estimate_traces(hvp, params, **probing)  # type: ignore[arg-type]
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
        if request.options is not None and request.error_of is not None:
            delta = {key: 0.5 * trace / numel * float(request.error_of(name, key).float().pow(2).sum())
                     for key in request.options[name]}
        else:
            delta = {b: 0.5 * trace / numel * _squared_rtn_error(module.weight, b, request.group_size)
                     for b in request.bits_options}
        result.append(UnitSensitivity(name=name, numel=numel, score=traces[name].trace, delta_loss=delta))
    return result, warnings


def _gradient_energy(weight: torch.Tensor, stats: UnitStatistics) -> float:
    """Output-gradient energy per token, or input energy without a loss."""
    tokens = max(stats.tokens, 1)
    if stats.output_grad_sq is not None:
        return float(stats.output_grad_sq.sum()) / tokens
    return float(torch.diagonal(stats.gram).sum()) / tokens


def _weight_fisher(weight: torch.Tensor, stats: UnitStatistics) -> float:
    if stats.weight_grad_sq is not None:
        return float(stats.weight_grad_sq.sum()) / max(stats.tokens, 1)
    return _gradient_energy(weight, stats)


def _mean_salience(weight: torch.Tensor, stats: UnitStatistics) -> float:
    return float(salience(weight, stats).mean())


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
    entry = METRICS[metric.value]
    loss = loss_fn if entry.uses_loss else None
    weight_grads = entry.weight_grads
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
    request: SensitivityRequest,
    *,
    loss_fn: LossFn | None = None,
    curvature_loss_fn: LossFn | None = None,
    blocks: tuple[str, nn.ModuleList] | None = None,
    stream: StreamedModel | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SensitivityResult:
    """Predicted loss increase of quantizing each unit at each of the request's options, under its metric.

    Args:
        units: qualified name -> ``nn.Linear`` inside ``model``.
        batches: calibration token ids, each ``(batch, seq_len)`` int64.
        request: the metric and its settings (:class:`sensitivity.request.SensitivityRequest`: the candidate
            widths or options with their errors, the token metrics' memory and precision, Hutchinson's probes).
        loss_fn: summed token loss ``loss_fn(model, batch)``; required by ``fisher_output_error``,
            ``hutchinson`` and the token metrics. ``token_kl`` (``MODEL_LABELS``) takes one whose labels are drawn
            from the model's own next-token distribution (``bitplan.sources.models.causal_lm_sampled_loss``).
        curvature_loss_fn: the second-order term's loss of a ``model_curvature`` metric (``token_taylor_kl``), whose
            first-order term is ``loss_fn``'s: ``bitplan.sources.models.causal_lm_sampled_loss``.
        blocks: the model's transformer blocks (``bitplan.sources.units.find_block_stack``), which ``units`` lie in:
            the Gram-based metrics then hold one block's input Grams at a time.
        stream: the model as a stream of blocks, with the losses as functions of its logits: the token metrics'
            pass then runs block by block (:func:`sensitivity.streamed.streamed_token_fisher`, the same terms with
            the memory of one block); other metrics ignore it.
        should_stop: checked between batches, probes and units; ``Cancelled`` is raised when it returns true.
    """
    started = time.perf_counter()
    entry = METRICS[request.metric.value]
    _check_request(request, has_loss=loss_fn is not None, has_curvature_loss=curvature_loss_fn is not None)
    inputs = MetricInputs(model=model, units=units, batches=batches, request=request, loss_fn=loss_fn,
                          curvature_loss_fn=curvature_loss_fn, blocks=blocks, stream=stream, on_progress=on_progress,
                          should_stop=should_stop)
    entries, warnings = entry.compute(inputs)
    for warning in warnings:
        logger.warning(warning)
    return SensitivityResult(metric=request.metric, units=tuple(entries), seconds=time.perf_counter() - started,
                             warnings=tuple(warnings))


def _check_request(request: SensitivityRequest, *, has_loss: bool, has_curvature_loss: bool) -> None:
    """Raise ``ValueError`` when the request's metric lacks what it needs (a loss, a curvature loss) or was given
    option errors it cannot use."""
    metric = request.metric
    entry = METRICS[metric.value]
    if entry.needs_loss and not has_loss:
        raise ValueError(f"metric {metric.value!r} needs a loss (a causal language model); use 'output_error'")
    if entry.model_curvature and not has_curvature_loss:
        raise ValueError(f"metric {metric.value!r} needs curvature_loss_fn (labels drawn from the model)")
    if request.options is not None and not entry.takes_errors:
        raise ValueError(f"metric {metric.value!r} predicts from RTN errors only; with formats use one of "
                         f"{', '.join(sorted(m.value for m in TAKES_ERRORS))}")


def _token_terms(inputs: MetricInputs, *, taylor: bool, curvature_stride: int = 1
                 ) -> tuple[list[UnitSensitivity], list[str]]:
    """token_fisher (second order) or token_taylor (first + second order) from the token Fisher pass; with
    ``inputs.curvature_loss_fn`` (token_taylor_kl) the second-order term from that loss on every
    ``curvature_stride``-th batch (the metric's stride, unless the request names one)."""
    request = replace(inputs.request, curvature_stride=inputs.request.curvature_stride or curvature_stride)
    if inputs.stream is not None:
        streamed = inputs.stream
        terms = streamed_token_fisher(streamed.stream, inputs.units, inputs.batches, streamed.boundaries, request,
                                      loss=streamed.loss,
                                      curvature_loss=streamed.curvature_loss if inputs.curvature_loss_fn else None,
                                      on_progress=inputs.on_progress, should_stop=inputs.should_stop)
    else:
        blocks = inputs.blocks
        terms = token_fisher(inputs.model, inputs.units, inputs.batches, request, loss_fn=inputs.loss_fn,
                             curvature_loss_fn=inputs.curvature_loss_fn, blocks=None if blocks is None else blocks[1],
                             on_progress=inputs.on_progress, should_stop=inputs.should_stop)
    return [UnitSensitivity(name=name, numel=module.weight.numel(), score=terms.energy[name],
                            delta_loss=(taylor_increase(terms.first_order[name], terms.second_order[name],
                                                        terms.first_order_std_error[name],
                                                        monotone=request.options is None)
                                        if taylor else terms.second_order[name]))
            for name, module in inputs.units.items()], []


def _statistics_metric(metric: Metric, predict: Callable[..., dict[int, float]],
                       score: Callable[[torch.Tensor, UnitStatistics], float]) -> ComputeFn:
    """A metric computed from each unit's calibration statistics (Grams, gradient energies) one block at a time."""

    def compute(inputs: MetricInputs) -> tuple[list[UnitSensitivity], list[str]]:
        by_name = {}
        for stats in _unit_statistics(inputs.model, inputs.units, inputs.batches, metric=metric,
                                      loss_fn=inputs.loss_fn, blocks=inputs.blocks, on_progress=inputs.on_progress,
                                      should_stop=inputs.should_stop):
            for name, entry in stats.items():
                check_stop(inputs.should_stop, "predicted error")
                weight = inputs.units[name].weight
                request = inputs.request
                errors = ({} if request.options is None or request.error_of is None else
                          {"errors": {key: request.error_of(name, key) for key in request.options[name]}})
                delta = predict(weight, entry, bits_options=request.bits_options, group_size=request.group_size,
                                **errors)
                by_name[name] = UnitSensitivity(name=name, numel=weight.numel(), score=score(weight, entry),
                                                delta_loss=delta)
                if inputs.on_progress is not None:
                    inputs.on_progress(Stage.PREDICTED_ERROR, len(by_name), len(inputs.units))
        return [by_name[name] for name in inputs.units], []

    return compute


register_metric(Metric.TOKEN_TAYLOR.value, needs_loss=True, takes_errors=True, token_pass=True)(
    functools.partial(_token_terms, taylor=True))
register_metric(Metric.TOKEN_FISHER.value, needs_loss=True, takes_errors=True, token_pass=True)(
    functools.partial(_token_terms, taylor=False))
register_metric(Metric.TOKEN_KL.value, needs_loss=True, takes_errors=True, model_labels=True, token_pass=True)(
    functools.partial(_token_terms, taylor=False))
register_metric(Metric.TOKEN_TAYLOR_KL.value, needs_loss=True, takes_errors=True, model_curvature=True,
                token_pass=True)(
    functools.partial(_token_terms, taylor=True, curvature_stride=CURVATURE_STRIDE))
register_metric(Metric.HUTCHINSON.value, needs_loss=True, takes_errors=True)(_hutchinson)
register_metric(Metric.OUTPUT_ERROR.value, needs_loss=False, takes_errors=True)(
    _statistics_metric(Metric.OUTPUT_ERROR, functools.partial(predict_output_error, fisher=False), _gradient_energy))
register_metric(Metric.FISHER_OUTPUT_ERROR.value, needs_loss=True, takes_errors=True)(
    _statistics_metric(Metric.FISHER_OUTPUT_ERROR, functools.partial(predict_output_error, fisher=True),
                       _gradient_energy))
register_metric(Metric.GWQ.value, needs_loss=True, weight_grads=True)(
    _statistics_metric(Metric.GWQ, predict_gwq, _weight_fisher))
register_metric(Metric.SLIM_SALIENCE.value, needs_loss=False, uses_loss=True)(
    _statistics_metric(Metric.SLIM_SALIENCE, predict_slim_salience, _mean_salience))
register_metric(Metric.BAQ.value, needs_loss=False, uses_loss=True)(
    _statistics_metric(Metric.BAQ, predict_baq, _gradient_energy))

NEEDS_LOSS = {Metric(name) for name, entry in METRICS.items() if entry.needs_loss}
TAKES_ERRORS = {Metric(name) for name, entry in METRICS.items() if entry.takes_errors}  # accept --formats
TOKEN_METRICS = {Metric(name) for name, entry in METRICS.items() if entry.token_pass}  # the per-token pass
MODEL_LABELS = {Metric(name) for name, entry in METRICS.items() if entry.model_labels}  # a loss on sampled labels
MODEL_CURVATURE = {Metric(name) for name, entry in METRICS.items() if entry.model_curvature}  # and the text's slope
USES_LOSS = {Metric(name) for name, entry in METRICS.items() if entry.uses_loss}  # gradient-weighted when available
