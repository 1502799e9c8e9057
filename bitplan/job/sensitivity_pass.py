"""Step 4 of the pipeline: one sensitivity pass over the calibration tokens under the spec's metric, reusing a
cached result for the same model, calibration tokens, metric and parameters."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from bitplan.errors import SpecError
from bitplan.job.planning import unit_sizes
from bitplan.job.quantize import Importance, encode_unit, input_grams, runs_gptq
from bitplan.quantizer.formats import decode_weight
from bitplan.quantizer.ggml_encode import ENCODERS
from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.sensitivity import Metric, SensitivityRequest, SensitivityResult, compute_sensitivity
from bitplan.sensitivity.activations import StopFn
from bitplan.sensitivity.api import (
    CURVATURE_STRIDE,
    MODEL_CURVATURE,
    MODEL_LABELS,
    NEEDS_LOSS,
    SECOND_ORDER_HVP_METHODS,
    TAKES_ERRORS,
    TOKEN_METRICS,
)
from bitplan.sensitivity.cache import SensitivityCache, cache_key
from bitplan.sensitivity.token_fisher import resolve_precision
from bitplan.sources.models import LoadedModel, ModelKind, causal_lm_loss, causal_lm_sampled_loss, use_eager_attention
from bitplan.sources.stream import DEFAULT_BOUNDARY_BYTES, Boundaries, streamed_pass
from bitplan.sources.units import find_block_stack
from bitplan.spec import JobSpec
from bitplan.stages import ProgressFn, Stage

logger = logging.getLogger(__name__)
HUTCHINSON_TOKENS = 512  # one window: a Hessian-vector product costs ~3.5-8 GB per 512 tokens, 5-7 s per probe


def resolve_metric(name: str, kind: ModelKind, target: str = "bitplan") -> Metric:
    """``auto`` -> for causal LMs token_kl to the gguf ``target``, token_taylor_kl to the others; output_error for
    other models. A loss-based metric needs a causal LM.

    Why the GGUF target differs: its files are judged by their KL to the source, and its candidates reach Q8_0 and
    Q6_K, whose rounding errors are small enough that token_taylor_kl's first-order term (the calibration text's
    own labels: nearly zero in expectation for a KL objective, and linear in the error) outweighs the real cost. On
    the float SmolLM2 at Q6_K's file bytes it ranked Q5_1 above Q8_0 in 15 of 212 layers, and its file measured
    KL 0.0100 against token_kl's 0.0058; token_kl was better at Q2_K, Q4_K_M and Q5_K_M too
    (``bench/results/peers-smollm2-float-source-token-kl-2026-12-07.json``). The packed target's default stays
    token_taylor_kl, chosen on its own formats by rank correlation with measured loss increases and cheaper."""
    if name == "auto":
        if kind is not ModelKind.CAUSAL_LM:
            return Metric.OUTPUT_ERROR
        return Metric.TOKEN_KL if target == "gguf" else Metric.TOKEN_TAYLOR_KL
    metric = Metric(name)
    if metric in NEEDS_LOSS and kind is not ModelKind.CAUSAL_LM:
        usable = sorted(m.value for m in Metric if m not in NEEDS_LOSS)
        raise SpecError(f"metric {name!r} needs a language-model loss; this {kind.value} model supports "
                        f"{', '.join(repr(m) for m in usable)}", param="metric")
    return metric


def format_errors(spec: JobSpec, units: dict[str, nn.Linear], importance: Importance | None,
                  grams: dict[str, torch.Tensor] | None = None
                  ) -> tuple[dict[str, list[str]], Callable[[str, Any], torch.Tensor]]:
    """Per unit its legal candidate formats, and each one's real weight error ``decode(encode(W)) - W`` with the
    encoder the quantize step will run (same importance vector; GPTQ on the same calibration Grams)."""
    names = spec.quantization.format_names
    assert names is not None
    options = {name: list(sizes) for name, sizes in unit_sizes(units, spec.widths, 8, names,
                                                                        spec.quantization.target.value).items()}

    def error_of(name: str, fmt: Any) -> torch.Tensor:
        weight = units[name].weight.detach().float()
        gram = None if grams is None else grams[name]
        return decode_weight(encode_unit(spec, weight, str(fmt), importance, name, gram)) - weight

    return options, error_of


def salience_width_errors(spec: JobSpec, metric: Metric) -> bool:
    """Whether the job's candidate widths are measured with the salience-calibrated encoder's real error (a job
    without formats under ``--quantizer rtn-salience``, the metric taking any weight error) instead of plain RTN's:
    the quantize step will run that encoder, so the allocator is told its error."""
    quantization = spec.quantization
    return (quantization.format_names is None and quantization.quantizer.value == "rtn-salience"
            and not quantization.mix_groups and metric in TAKES_ERRORS)


def width_errors(spec: JobSpec, units: dict[str, nn.Linear], importance: Importance
                 ) -> tuple[dict[str, list[int]], Callable[[str, Any], torch.Tensor]]:
    """Per unit the job's candidate widths, and each one's real weight error under the salience-calibrated
    encoder at the job's group size (with ``importance``, the input energy the quantize step weights by)."""
    group_size = spec.quantization.group_size

    def error_of(name: str, bits: Any) -> torch.Tensor:
        weight = units[name].weight.detach().float()
        encoded = quantize_rtn(weight, bits=int(bits), group_size=group_size, salience=importance[name].float())
        return dequantize_weight(encoded) - weight

    return {name: list(spec.widths) for name in units}, error_of


def compute_dtype_key(loaded: LoadedModel) -> dict[str, str]:
    """The cache key's part for the dtype the model's blocks computed in: a streamed job's placement
    (``compute_dtype``, resolved by :mod:`bitplan.sources.devices`), float32 for a model in memory. Empty for float32,
    so the keys of results cached before the option existed (all float32) stay valid; a bfloat16 pass's products
    differ from float32's, so it never reuses, or is reused as, a float32 result."""
    dtype = torch.float32 if loaded.lazy is None else loaded.lazy.placement.dtype
    return {} if dtype == torch.float32 else {"compute_dtype": str(dtype).removeprefix("torch.")}


def sensitivity_request(spec: JobSpec, metric: Metric) -> SensitivityRequest:
    """The job's sensitivity request under ``metric``: its candidate widths and group size, the token metrics'
    memory and precision, Hutchinson's probes (the candidate formats' errors are added when the pass runs)."""
    options = spec.sensitivity
    return SensitivityRequest(metric=metric, bits_options=spec.widths, group_size=spec.quantization.group_size,
                              max_error_bytes=options.max_error_bytes, precision=options.precision.value,
                              hutchinson=options.hutchinson)


def sensitivity_key(spec: JobSpec, request: SensitivityRequest, loaded: LoadedModel, units: dict[str, nn.Linear],
                    calibration_sha256: str) -> str:
    """The cache key of ``request``'s result on this model and calibration set: the metric, its parameters, and
    the encoders behind each candidate's error (the formats, the integer encoder, the dtype of the products)."""
    metric = request.metric
    formats = spec.quantization.format_names
    quantizer = spec.quantization.quantizer.value
    int_encoder = quantizer if quantizer in ("rtn-salience", "gptq", "gptq-salience") else "rtn"
    if runs_gptq(spec):
        int_encoder += f" damp={spec.quantization.gptq_damp}"
    ggml = ENCODERS[spec.quantization.encoder.value].version  # "ggml_quantize_chunk" for llama.cpp's, as before
    encoder = None if formats is None else {"formats": list(formats), "ggml": ggml,
                                            "int_encoder": int_encoder, "first_order": ">= 0"}
    if salience_width_errors(spec, metric):
        encoder = {"widths_encoder": "rtn-salience"}
    if metric in TOKEN_METRICS:  # the dtype its per-token products ran in
        precision = resolve_precision(request.precision)
        encoder = {**(encoder or {}), "projection": str(precision).removeprefix("torch.")}
    return cache_key(model_sha256=loaded.source_sha256, calibration_sha256=calibration_sha256, metric=metric.value,
                     bits=list(request.bits_options), group_size=request.group_size, units=list(units),
                     hutchinson=asdict(request.hutchinson) if metric is Metric.HUTCHINSON else None,
                     **({} if encoder is None else {"encoder": encoder}),
                     **({"curvature_stride": request.curvature_stride or CURVATURE_STRIDE}
                        if metric in MODEL_CURVATURE else {}),
                     **compute_dtype_key(loaded))


def measure(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear], calibration: Any,
            on_progress: ProgressFn | None, should_stop: StopFn | None, cache: SensitivityCache | None,
            importance: Importance | None = None) -> tuple[SensitivityResult, dict[str, str]]:
    """The sensitivities and the calibration record's fields saying whether the cache had them
    (``sensitivity_cache``: ``hit``, ``miss`` or ``off``) and, on a hit, from where (``sensitivity_cache_from``:
    this machine, or the shared store another host filled). With formats, each option's error is that format's
    with its encoder (``importance``: the calibration's input energy)."""
    metric = resolve_metric(spec.sensitivity.metric.value, loaded.kind, spec.quantization.target.value)
    if spec.quantization.format_names is not None and metric not in TAKES_ERRORS:
        raise SpecError(f"metric {metric.value!r} predicts from RTN errors only; with --formats choose one of "
                        f"{', '.join(sorted(m.value for m in TAKES_ERRORS))}", param="metric")
    key = sensitivity_key(spec, sensitivity_request(spec, metric), loaded, units, calibration.sha256)
    cached, origin = cache.lookup(key) if cache is not None else (None, None)
    if cached is not None and origin is not None:
        logger.info("sensitivity: reusing the cached %s result %s from %s", metric.value, key[:12], origin)
        return cached, {"sensitivity_cache": "hit", "sensitivity_cache_from": origin}
    result = run_sensitivity(spec, loaded, units, metric, calibration.tokens, on_progress, should_stop,
                             importance=importance)
    if cache is not None:
        cache.put(key, result)
    return result, {"sensitivity_cache": "miss" if cache is not None else "off"}


def run_sensitivity(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear], metric: Metric,
                    tokens: torch.Tensor, on_progress: ProgressFn | None,
                    should_stop: StopFn | None = None, importance: Importance | None = None, *,
                    stream: bool | None = None) -> SensitivityResult:
    """Predicted loss increase per (unit, candidate bit width), or per (unit, legal candidate format), under
    ``metric``. With ``stream`` the token metrics run block by block where the model allows it
    (:func:`bitplan.sources.stream.streamed_pass`: the same terms, one block's weights and activations at a time); with
    ``False`` over the whole model (the reference); by default streamed when the model is lazy (not in memory),
    else whole: with the model in memory the whole-model pass saves one forward per window (``bench/stream_check.py``
    measured the streamed pass at 1.21x its time on SmolLM2, with identical predictions)."""
    request = sensitivity_request(spec, metric)
    if spec.quantization.format_names is not None:
        grams = input_grams(loaded, units, tokens, on_progress, should_stop) if runs_gptq(spec) else None
        options, error_of = format_errors(spec, units, importance, grams)
        request = replace(request, options=options, error_of=error_of)
    elif salience_width_errors(spec, metric) and importance is not None:
        options, error_of = width_errors(spec, units, importance)
        request = replace(request, options=options, error_of=error_of)
    loss_fn = curvature_loss_fn = None  # the metrics that need one were checked to have a causal LM
    if loaded.kind is ModelKind.CAUSAL_LM:  # token_kl's loss, and token_taylor_kl's second-order one, take labels
        loss_fn = causal_lm_sampled_loss if metric in MODEL_LABELS else causal_lm_loss  # drawn from the model
        curvature_loss_fn = causal_lm_sampled_loss if metric in MODEL_CURVATURE else None
    batches = list(torch.split(tokens, 1))
    hutchinson = request.hutchinson
    if metric is Metric.HUTCHINSON:
        if hutchinson.method in SECOND_ORDER_HVP_METHODS:
            use_eager_attention(loaded.model)
        batches = [tokens[:1, :HUTCHINSON_TOKENS]]
        if hutchinson.method == "jvp":  # torch.func cannot start a graph at detached embeddings
            loss_fn = functools.partial(causal_lm_loss, graph_from_embeddings=False)
    if on_progress is not None:  # the stage's name from its start (its first step can take a while)
        first = (Stage.TOKEN_FISHER if metric in TOKEN_METRICS else
                 Stage.HUTCHINSON_PROBES if metric is Metric.HUTCHINSON else Stage.CALIBRATION_STATISTICS)
        on_progress(first, 0, 1)
    with Boundaries(DEFAULT_BOUNDARY_BYTES) as boundaries:
        streamed = None
        if (stream if stream is not None else loaded.lazy is not None) and metric in TOKEN_METRICS:
            streamed = streamed_pass(loaded.lazy or loaded.model, units, loss_fn=loss_fn,
                                     curvature_loss_fn=curvature_loss_fn, boundaries=boundaries)
        return compute_sensitivity(loaded.model, units, batches, request, loss_fn=loss_fn,
                                   curvature_loss_fn=curvature_loss_fn, blocks=find_block_stack(loaded.model),
                                   stream=streamed, on_progress=on_progress, should_stop=should_stop)


def cached_importance(loaded: LoadedModel, units: dict[str, nn.Module], calibration: Any,
                      cache: SensitivityCache | None, compute: Callable[[], Importance]) -> Importance:
    """Every unit's input energy on the calibration windows (the encoders' importance): from the cache beside the
    sensitivities when this model and calibration measured it before, else ``compute()`` (kept there for the next
    job: a second budget on a cached model then runs no calibration forward at all)."""
    key = cache_key(model_sha256=loaded.source_sha256, calibration_sha256=calibration.sha256,
                    statistic="input_energy", units=list(units), **compute_dtype_key(loaded))
    store = None if cache is None else cache.statistics()
    cached = None if store is None else store.get(key)
    if cached is not None and set(cached) == set(units):
        logger.info("calibration statistics: reusing the cached input energy %s", key[:12])
        return {name: cached[name] for name in units}
    importance = compute()
    if store is not None:
        store.put(key, importance)
    return importance
