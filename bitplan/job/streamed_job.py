"""The default job for a model larger than memory: a Hugging Face folder to a GGUF file, every stage streamed.

:func:`run_streamed_gguf` numbers its steps; each holds one block's weights at a time:

1. Open the folder lazily (skeleton on meta, shards read a tensor at a time) and check the GGUF target can write it;
   resolve the device and compute dtype, and plan the job's memory under ``max_memory`` (refused, saying what
   would fit, when it cannot: :mod:`bitplan.job.memory_plan`).
2. Plan the budgets against the achievable range of the gguf target's candidate types.
3. Build the calibration windows and the encoders' importance (input energy), streamed forward.
4. The sensitivity (the default ``token_taylor_kl`` over each candidate type's real error): streamed forward,
   loss at the head, exact backward block by block; cached like any job's.
5. Allocate each budget.
6. Write each budget's GGUF tensor by tensor (:func:`bitplan.targets.exports.gguf_stream.write_gguf_streamed`) and the
   importance matrix beside it.
7. Measure its quality on held-back windows against the source, both streamed block by block.

Progress is reported per block (``calibration statistics``, ``token Fisher``, ``quality``) and per tensor
(``write``), each step of a stage costing about the same, so the worker's rate-based ETA holds.

What it does not do yet (issue 41): a packed artifact or manifest (the GGUF and its imatrix are the output),
GPTQ encoders, latency budgets, whole-file budgets with the head as a unit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bitplan.errors import BitplanError, ModelReferenceError, SpecError
from bitplan.hashing import sha256_file
from bitplan.job.memory_plan import MemoryPlan, plan_memory, shape_of
from bitplan.job.moe_job import reported
from bitplan.job.planning import budgets_in_bytes, make_plans, unit_sizes
from bitplan.job.quantize import encode_unit, runs_gptq
from bitplan.job.sensitivity_pass import cached_importance, measure
from bitplan.quantizer.formats import FORMATS, decode_weight
from bitplan.report.quality import QualityReport, QualityTally, heldout_windows
from bitplan.sensitivity.activations import StopFn, check_stop
from bitplan.sensitivity.cache import SensitivityCache
from bitplan.sensitivity.kl import swapped_weights
from bitplan.sensitivity.token_fisher import resolve_precision
from bitplan.sources import LazyModel, Placement, open_lazy
from bitplan.sources.calibration import build_calibration_set
from bitplan.sources.devices import resolve_compute_dtype, resolve_device
from bitplan.sources.lazy import return_freed_memory_promptly
from bitplan.sources.models import LoadedModel, ModelKind, resolve_reference
from bitplan.sources.moe import RoutingReport, measure_routing, routed_tokens
from bitplan.sources.stream import (
    DEFAULT_BOUNDARY_BYTES,
    Boundaries,
    DecoderStream,
    stream_forward,
    stream_input_energy,
)
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec
from bitplan.stages import ProgressFn, Stage
from bitplan.targets.artifact import swap_into_place
from bitplan.targets.exports.gguf_file import IMATRIX_FILE, write_imatrix
from bitplan.targets.exports.gguf_stream import write_gguf_streamed

if TYPE_CHECKING:
    from bitplan.job.pipeline import RunResult

logger = logging.getLogger(__name__)
GGUF_FILE = "model.gguf"
STREAMED_NOTE = ("streamed job (a model over 2 GiB in float32): the output is the GGUF file and its importance "
                 "matrix; no packed artifact or manifest is written")
STREAMED_ERROR_BYTES = 512 << 20  # candidate-type errors held at once (a 1B block's ten types take 1.2 GB)
STREAM_ABOVE_BYTES = 2 << 30  # a Hugging Face folder whose float32 weights exceed this streams (gguf target)


def streams(spec: JobSpec) -> bool:
    """Whether ``spec`` runs as the streamed job: a gguf job from a Hugging Face folder whose float32 weights
    exceed :data:`STREAM_ABOVE_BYTES`, with what the streamed job supports (size budgets, default encoders)."""
    quantization, budget = spec.quantization, spec.budget
    if (quantization.target.value != "gguf" or quantization.format_names is None or runs_gptq(spec)
            or budget.has_time_budget or budget.file_bytes is not None or budget.uniform_bits is not None
            or spec.refinement.kl_refine_windows > 0):
        return False
    try:
        source_format, path = resolve_reference(spec.model)
    except ModelReferenceError:
        return False
    if source_format != "hf-folder":
        return False
    from bitplan.sources.tensors import SafetensorsStore

    store = SafetensorsStore.of_folder(path)
    return sum(math.prod(store.shape(n)) for n in store.names()) * 4 > STREAM_ABOVE_BYTES


def run_streamed_gguf(spec: JobSpec, *, out_dirs: list[Path], on_progress: ProgressFn | None = None,
                      cache: SensitivityCache | None = None, should_stop: StopFn | None = None) -> list[RunResult]:
    """The module docstring's steps for each budget of ``spec`` (``out_dirs[i]`` for budget ``i``); one report
    per budget. ``should_stop`` is asked at every progress report (a block, a window, a tensor), so a cancel takes
    effect within one block's work."""
    on_progress = stopping(on_progress, should_stop)
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - clock[0], 3)
        clock[0] = now

    spec = capped(spec)
    return_freed_memory_promptly()  # a block's weights leave the process when it is released
    if on_progress is not None:
        on_progress(Stage.LOAD, 0, 1)
    loaded, folder = _open(spec)  # 1
    lazy: LazyModel = loaded.lazy
    stream, memory = _place(spec, lazy)
    units = find_units(lazy.model)
    names = spec.quantization.format_names
    sizes = unit_sizes(units, spec.widths, spec.quantization.group_size, names, "gguf")  # 2
    numel = sum(m.weight.numel() for m in units.values())
    budgets = budgets_in_bytes(spec, sizes, numel, None)
    lap("load")
    options = spec.calibration
    calibration = build_calibration_set(lazy.tokenizer, text_file=None if options.text is None else Path(options.text),
                                        num_samples=options.num_samples, seq_len=options.seq_len,
                                        seed=options.seed)  # 3
    batches = list(torch.split(calibration.tokens, 1))
    if on_progress is not None:
        on_progress(Stage.LOAD, 1, 1)

    importance, routing = _importance_and_routing(loaded, stream, units, calibration, batches, cache,
                                                  min(DEFAULT_BOUNDARY_BYTES, memory.boundaries_in_memory),
                                                  on_progress)
    lap("calibration statistics")
    sensitivity, cache_state = measure(spec, loaded, units, calibration, on_progress, should_stop, cache,
                                       importance)  # 4
    lap("sensitivity")
    plans = make_plans(spec, units, sizes, sensitivity, budgets, None)  # 5
    lap("allocation")
    heldout = None
    if spec.refinement.quality_windows > 0:
        text = None if spec.refinement.eval_text is None else Path(spec.refinement.eval_text)
        heldout = heldout_windows(lazy.tokenizer, windows=spec.refinement.quality_windows,
                                  seq_len=spec.refinement.quality_seq_len, text_file=text)
    record = {"sha256": calibration.sha256, "source": calibration.source, "num_samples": options.num_samples,
              "seq_len": options.seq_len, "seed": options.seed, **cache_state}
    made = _Made(loaded=loaded, folder=folder, stream=stream, units=units, importance=importance,
                 calibration=calibration, sensitivity=sensitivity, sizes=sizes, record=record, timings=timings,
                 routing=routing)
    return [reported(_write_budget(spec, made, plan, out, heldout, on_progress), routing)
            for plan, out in zip(plans, out_dirs, strict=True)]


def _importance_and_routing(loaded: LoadedModel, stream: DecoderStream, units: dict[str, nn.Linear],
                            calibration: Any, batches: list[torch.Tensor], cache: SensitivityCache | None,
                            boundary_bytes: int, on_progress: ProgressFn | None
                            ) -> tuple[dict[str, torch.Tensor], RoutingReport | None]:
    """The units' input energy (cached) and a MoE model's tokens per expert, counted during the energy's
    streamed forward, or in a forward of their own when the energy came from the cache."""
    model = loaded.lazy.model
    counted: list[RoutingReport] = []

    def energy() -> dict[str, torch.Tensor]:
        with routed_tokens(model) as counts, Boundaries(boundary_bytes) as boundaries:
            measured = stream_input_energy(stream, units, batches, boundaries, on_progress=on_progress)
        counted.extend([RoutingReport.of(counts)] if counts else [])
        return measured

    def forward() -> None:
        with Boundaries(boundary_bytes) as boundaries:
            stream_forward(stream, batches, boundaries)

    importance = cached_importance(loaded, units, calibration, cache, energy)
    return importance, counted[0] if counted else measure_routing(model, forward)


@dataclass
class _Made:
    """What every budget's output shares: the model, its stream and units, and what steps 1 to 5 measured."""

    loaded: LoadedModel
    folder: Path
    stream: DecoderStream
    units: dict[str, nn.Linear]
    importance: dict[str, torch.Tensor]
    calibration: Any
    sensitivity: Any
    sizes: dict[str, dict[str, int]]
    record: dict[str, Any]
    timings: dict[str, float]
    routing: RoutingReport | None = None  # a MoE model's tokens per expert


def _write_budget(spec: JobSpec, made: _Made, plan: Any, out: Path, heldout: tuple[torch.Tensor, str] | None,
                  on_progress: ProgressFn | None) -> RunResult:
    """Steps 6 and 7 for one budget's ``plan``: its GGUF and importance matrix in ``out``, its quality, its
    report."""
    from bitplan.job.pipeline import RunResult

    lazy, stream, units, importance = made.loaded.lazy, made.stream, made.units, made.importance
    calibration, sensitivity, sizes = made.calibration, made.sensitivity, made.sizes
    numel = sum(m.weight.numel() for m in units.values())
    chosen = dict(plan.formats or {})

    def encode(unit: str, weight: torch.Tensor, chosen: dict[str, str] = chosen) -> Any:
        return encode_unit(spec, weight, chosen[unit], importance, unit)

    started = time.perf_counter()
    staging = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")  # the folder appears whole or not at all
    try:
        written = write_gguf_streamed(lazy, made.folder, staging / GGUF_FILE, chosen=chosen, encode=encode,  # 6
                                      stack_name=stream.stack_name,
                                      on_tensor=None if on_progress is None else
                                      lambda done, total: on_progress(Stage.WRITE, done, total))
        write_imatrix(staging / IMATRIX_FILE, made.folder, importance, tokens=int(calibration.tokens.numel()),
                      chunk_size=int(calibration.tokens.shape[-1]), dataset=str(calibration.source),
                      unit_tokens=None if made.routing is None else made.routing.unit_tokens(importance))
        stage_times = {"write": round(time.perf_counter() - started, 3)}
        quality = None
        if heldout is not None:  # 7
            started = time.perf_counter()
            quality = stream_quality(stream, units, lambda unit, weight: decode_weight(encode(unit, weight)),
                                     heldout[0], text=heldout[1], on_progress=on_progress)
            stage_times["quality"] = round(time.perf_counter() - started, 3)
        swap_into_place(staging, out, replaceable=lambda d: {p.name for p in d.iterdir()} <= {GGUF_FILE, IMATRIX_FILE},
                        what=f"a streamed job's {GGUF_FILE} and {IMATRIX_FILE}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RunResult(
        artifact=str(out), bits_per_weight=8 * written.unit_bytes / numel, bytes=written.unit_bytes,
        status=plan.solver.status, objective=plan.solver.objective, lower_bound=plan.solver.lower_bound,
        units=[{"name": n, "bits": FORMATS[f].nominal_bits, "format": f} for n, f in chosen.items()],
        model=spec.model, metric=sensitivity.metric.value,
        budget={"bits_per_weight": plan.budget_bits_per_weight, "bytes": plan.budget_bytes},
        calibration=made.record, manifest_sha256="", timings_s={**made.timings, **stage_times},
        predicted_bytes=sum(sizes[n][f] for n, f in chosen.items()),
        warnings=[*sensitivity.warnings, STREAMED_NOTE], quality=None if quality is None else quality.to_json(),
        file_bits_per_parameter=8 * written.file_bytes / lazy.parameters(), target="gguf",
        files=[{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in (out / GGUF_FILE, out / IMATRIX_FILE)],
        file_bytes=written.file_bytes)


def stopping(on_progress: ProgressFn | None, should_stop: StopFn | None) -> ProgressFn | None:
    """``on_progress`` that first raises :class:`Cancelled` when ``should_stop`` says so."""
    if should_stop is None:
        return on_progress

    def report(stage: Stage | str, done: int, total: int) -> None:
        check_stop(should_stop, Stage(stage).value)
        if on_progress is not None:
            on_progress(stage, done, total)

    return report


def preflight(spec: JobSpec) -> MemoryPlan | None:
    """The memory plan of ``spec`` if it runs as the streamed job (``None`` otherwise), refused with
    :class:`bitplan.errors.SpecError` when it cannot fit: for a caller that wants the refusal before queueing (the
    service's job validation). It reads the config and the shards' headers only; the plan's ``process`` part and
    default cap are this process's and this machine's, so a worker elsewhere plans again when it starts."""
    if not streams(spec):
        return None
    return _place(capped(spec), open_lazy(spec.model))[1]


def capped(spec: JobSpec) -> JobSpec:
    """``spec`` as the streamed job runs it: at most :data:`STREAMED_ERROR_BYTES` of candidate errors held at once
    (the plan and the job must agree on it)."""
    return dataclasses.replace(spec, sensitivity=dataclasses.replace(
        spec.sensitivity, max_error_bytes=min(spec.sensitivity.max_error_bytes, STREAMED_ERROR_BYTES)))


def _place(spec: JobSpec, lazy: LazyModel) -> tuple[DecoderStream, MemoryPlan]:
    """Step 1's second half: the device and compute dtype the job asked for, and its memory plan (refused with
    what would fit when over ``max_memory``); the stream then computes there and keeps what the plan leaves of the
    cap for the hidden states between blocks."""
    options = spec.sensitivity
    device = resolve_device(options.device.value)
    dtype = resolve_compute_dtype(options.compute_dtype.value)
    lazy.placement = Placement(device=device, dtype=dtype)
    stream = DecoderStream(lazy)
    names = spec.quantization.format_names or ()
    shape = shape_of(stream, compute=dtype, windows=spec.calibration.num_samples, seq_len=spec.calibration.seq_len,
                     options=max(len(names), 1), error_bytes=options.max_error_bytes,
                     error_element_bytes=resolve_precision(options.precision.value).itemsize)
    plan = plan_memory(shape, max_memory=options.max_memory)
    lazy.placement = Placement(device=device, dtype=dtype, boundary_bytes=plan.boundaries_in_memory)
    logger.info("streamed job on %s in %s: memory plan %s", device, dtype, plan.to_json())
    return stream, plan


def _open(spec: JobSpec) -> tuple[LoadedModel, Path]:
    """Step 1: the lazy model as a :class:`LoadedModel` (its ``model`` the skeleton), refused before any heavy
    work where this path cannot run the job."""
    source_format, path = resolve_reference(spec.model)
    if source_format != "hf-folder":
        raise ModelReferenceError(f"the streamed job reads a Hugging Face folder; {spec.model!r} is a {source_format}"
                                  f" source", param="model")
    if spec.quantization.target.value != "gguf" or spec.quantization.format_names is None:
        raise SpecError("the streamed job writes the gguf target from its candidate types", param="target")
    if runs_gptq(spec) or spec.budget.has_time_budget or spec.budget.file_bytes is not None:
        raise SpecError("the streamed job takes a bits-per-weight or bytes budget with the default encoders "
                        "(GPTQ, latency and whole-file budgets need the whole model)", param="quantizer")
    from bitplan.targets.exports.gguf_source import open_source

    try:
        open_source(path)  # refuses an architecture the GGUF writer does not know
    except BitplanError as error:
        raise ModelReferenceError(f"the gguf target cannot be written from {spec.model!r}: {error}",
                                  param="model") from None
    lazy = open_lazy(spec.model)
    if lazy.kind is not ModelKind.CAUSAL_LM:
        raise ModelReferenceError("the streamed job quantizes causal language models", param="model")
    first = sorted(path.glob("*.safetensors"))[0]
    loaded = LoadedModel(model=lazy.model, tokenizer=lazy.tokenizer, kind=lazy.kind, reference=spec.model,
                         source_format=source_format, source_path=path, source_sha256=sha256_file(first), lazy=lazy)
    return loaded, path


def stream_quality(stream: DecoderStream, units: dict[str, nn.Linear],
                   decoded: Callable[[str, torch.Tensor], torch.Tensor], windows: torch.Tensor, *,
                   text: str, on_progress: ProgressFn | None = None) -> QualityReport:
    """:func:`bitplan.report.quality.measure_quality` with both models streamed: each block runs on the source's hidden
    states, then with its units' weights replaced by ``decoded(unit, weight)`` on the quantized model's (the
    encoders read the weights on the host); ``on_progress`` hears of each block. A streamed block's weights are
    replaced in place (it is read from the store again when next needed), so the stage holds one block, not a block
    and its decoded copy (a Qwen3-30B-A3B-shaped layer: 2.3 GB each)."""
    count = len(windows)
    source = [stream.embed(window) for window in torch.split(windows, 1)]
    quantized = [hidden.clone() for hidden in source]
    for index in range(stream.num_blocks):
        names = [n for n in units if stream.block_of(n) == index]
        with stream.block(index) as run, torch.no_grad():
            for w in range(count):
                source[w] = run(source[w])
            if stream.source.resident:  # a model held whole: its weights come back after this block
                replaced = {n: decoded(n, units[n].weight.detach().float().cpu()).to(stream.device) for n in names}
                with swapped_weights(units, replaced):
                    for w in range(count):
                        quantized[w] = run(quantized[w])
            else:  # in place, one unit at a time: the block goes back to meta after this pass (peak: one block)
                for n in names:
                    weight = units[n].weight
                    weight.data = decoded(n, weight.detach().float().cpu()).to(weight.device, weight.dtype)
                for w in range(count):
                    quantized[w] = run(quantized[w])
        if on_progress is not None:
            on_progress(Stage.QUALITY, index + 1, stream.num_blocks)
    tally = QualityTally()
    with stream.head() as head, torch.no_grad():
        for w, window in enumerate(torch.split(windows, 1)):
            tally.add(head(source[w])[0, :-1].cpu(), head(quantized[w])[0, :-1].cpu(), window[0, 1:])
    return tally.report(windows, text=text)
