"""The whole job as plain calls: a :class:`~bitplan.spec.JobSpec` -> packed, loadable artifacts and a report.

:func:`run_budgets` is the one pipeline; its docstring numbers the steps, each one call into its own module
(``planning``, ``quantize``, ``refine``, ``artifact``). It knows nothing of HTTP or queues.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.job.moe_job import reported, routing_of_windows, with_unreached_pinned
from bitplan.job.planning import (
    LatencyPlan,
    Plan,
    Sizes,
    job_problem,
    make_plans,
    option_labels,
    solve_plan,
)
from bitplan.job.quantize import Quantized, measure_kl, quantize_plans, spec_needs_grams
from bitplan.job.refine import refine_allocation
from bitplan.job.run_result import Measured, RunResult, result_of, unit_format
from bitplan.job.sensitivity_pass import cached_importance, measure, resolve_metric, salience_width_errors
from bitplan.job.sizing import head_units, plan_latency, resolve_named_size, size_units
from bitplan.job.target_files import GGUF_FILE, listed, measure_latency, write_target
from bitplan.quantizer import search_memo
from bitplan.quantizer.formats import decode_weight
from bitplan.quantizer.methods import QUANTIZER_LABELS
from bitplan.report.frontier import PROBLEM_FILE, problem_document, write_problem
from bitplan.report.quality import QualityReport, heldout_windows, measure_quality
from bitplan.sensitivity import SensitivityResult
from bitplan.sensitivity.activations import StopFn, check_stop
from bitplan.sensitivity.cache import CacheMirror, SensitivityCache
from bitplan.sensitivity.importance import input_energy
from bitplan.sources.calibration import build_calibration_set
from bitplan.sources.models import LoadedModel, ModelKind, load_model
from bitplan.sources.units import find_block_stack, find_units
from bitplan.spec import JobSpec
from bitplan.stages import ProgressFn, Stage
from bitplan.targets.artifact import write_artifact
from bitplan.targets.manifest import RunRecord, SensitivityRecord, SourceRecord

logger = logging.getLogger(__name__)






class Clock:
    """Seconds per stage, as laps."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._last, 3)
        self._last = now


def run_pipeline(spec: JobSpec, *, out: Path, on_progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None, use_cache: bool = True, cache_dir: Path | None = None
                 ) -> RunResult:
    """Quantize ``spec.model`` under its single budget and write the artifact to ``out``."""
    return run_budgets(spec, out_dirs=[out], on_progress=on_progress, should_stop=should_stop, use_cache=use_cache,
                       cache_dir=cache_dir)[0]


def run_budgets(spec: JobSpec, *, out_dirs: list[Path], on_progress: ProgressFn | None = None,
                should_stop: StopFn | None = None, use_cache: bool = True, cache_dir: Path | None = None,
                cache_mirror: CacheMirror | None = None) -> list[RunResult]:
    """Quantize ``spec.model`` at each of its budgets (``out_dirs[i]`` for budget ``i``), measuring once.

    1. Load the model reference (bundled id, HF folder, .safetensors, .gguf).
    2. Find the units (linear layers in the blocks) and check every budget against the achievable range (a named
       size, ``--size-of``, resolved first to the bytes of llama.cpp's preset file).
    3. Build the calibration set (text file or built-in text) and record its hash.
    4. Compute the sensitivity: predicted loss increase per (unit, bit width), from the cache when measured before.
    5. Plan each budget: bits per unit by the allocator (a uniform baseline is a trivial plan).
    6. Quantize every unit of every plan (RTN, GPTQ, with or without salience; one Gram pass for all).
    7. Optionally re-solve each plan with the block KL shares the quantized model measures.
    8. Measure each plan's quality on held-back windows, pack and write its artifact atomically, measure its KL
       divergence on calibration windows, and report; sizes come from the files.

    ``use_cache``: reuse sensitivities measured before, kept under ``cache_dir`` (default ``$BITPLAN_CACHE_DIR``
    or ``~/.cache/bitplan``) and, with ``cache_mirror``, shared with other machines through it.
    """
    if len(out_dirs) != spec.budgets:
        raise BitplanError(f"give one output directory per budget: {spec.budgets} budgets, {len(out_dirs)} "
                           f"directories")
    cache = SensitivityCache(cache_dir, mirror=cache_mirror) if use_cache else None
    named = spec.budget.size_of
    spec = resolve_named_size(spec)  # a llama.cpp preset's name: its file's bytes, before anything is planned
    from bitplan.job.streamed_job import run_streamed_gguf, streams

    try:
        if streams(spec):  # a model over 2 GiB in float32 to a GGUF: every stage one block at a time
            results = run_streamed_gguf(spec, out_dirs=out_dirs, on_progress=on_progress, cache=cache,
                                        should_stop=should_stop)
        else:
            results = _run_in_memory(spec, out_dirs, on_progress, should_stop, cache)
    finally:
        search_memo.SEARCHES.clear()  # the grid searches this job's encoders shared: not kept past it
    if named is None:
        return results
    return [dataclasses.replace(r, budget={**r.budget, "size_of": named.value}) for r in results]


def _run_in_memory(spec: JobSpec, out_dirs: list[Path], on_progress: ProgressFn | None, should_stop: StopFn | None,
                   cache: SensitivityCache | None) -> list[RunResult]:
    """Steps 1-8 of :func:`run_budgets` with the whole model in memory."""
    clock = Clock()
    if on_progress is not None:
        on_progress(Stage.LOAD, 0, 1)
    loaded = load_model(spec.model)  # 1
    clock.lap("load")
    if on_progress is not None:
        on_progress(Stage.LOAD, 1, 1)
    sized = size_units(spec, loaded)  # 2
    planned, sizes = sized.planned, sized.sizes
    latency = plan_latency(spec, loaded, sized.units, sizes, on_progress)
    clock.lap("plan")
    check_stop(should_stop, "the load")  # a cancel that came while the model loaded: before any heavy work
    measured = calibrate_and_measure(spec, loaded, sized.units, on_progress, should_stop, cache, sized.head)  # 3, 4
    refinement = spec.refinement
    if refinement.quality_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM:
        text = None if refinement.eval_text is None else Path(refinement.eval_text)
        measured.heldout = heldout_windows(loaded.tokenizer, windows=refinement.quality_windows,
                                           seq_len=refinement.quality_seq_len, text_file=text)
    if measured.sensitivity is not None:
        clock.lap("sensitivity")
    measured.routing = routing_of_windows(loaded.model, measured.tokens)  # a MoE model's tokens per expert
    spec = with_unreached_pinned(spec, measured.routing, planned)
    plans = make_plans(spec, planned, sizes, measured.sensitivity, sized.budgets, latency)  # 5
    quantized = quantize_plans(spec, loaded, planned, [p.bits if p.formats is None else p.formats for p in plans],
                               measured.tokens, on_progress, should_stop, importance=measured.importance)  # 6
    clock.lap("quantize")
    reports: list[dict[str, Any] | None] = [None] * len(plans)
    if spec.refinement.kl_refine_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM and measured.sensitivity:
        plans, quantized, reports = refine_plans(spec, loaded, planned, sizes, measured, plans, quantized,
                                                 on_progress, should_stop)  # 7
        clock.lap("kl refinement")
    return [reported(write_run(spec, loaded, planned, plan, measured, each, out_dir, report, clock.timings,
                               budget_progress(on_progress, index, len(plans)), sizes, latency,
                               head=tuple(sized.head)), measured.routing)
            for index, (plan, each, out_dir, report) in enumerate(zip(plans, quantized, out_dirs, reports,
                                                                      strict=True))]


def budget_progress(on_progress: ProgressFn | None, index: int, count: int) -> ProgressFn | None:
    """Step 8 runs once per budget: budget ``index``'s ``(stage, done, total)`` reported as steps of all ``count``
    budgets' (``index * total + done`` of ``count * total``), so a sweep's first "kl check" is not its last (issue
    45: "kl check 99 %, ETA 0" while the next budget's quality, write and check ran)."""
    if on_progress is None or count == 1:
        return on_progress
    report = on_progress

    def of_all(stage: str, done: int, total: int) -> None:
        report(stage, index * total + done, count * total)

    return of_all


def calibrate_and_measure(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear],
                          on_progress: ProgressFn | None, should_stop: StopFn | None,
                          cache: SensitivityCache | None, head: dict[str, nn.Linear] | None = None) -> Measured:
    """Steps 3-4: the calibration tokens (when anything needs them) and the sensitivities (not for uniform).
    ``head``: units measured apart and cached apart (the block layers' result is the one a job without them
    reuses), then joined (each unit's terms are its own)."""
    uniform = spec.budget.uniform_bits is not None
    wants_kl = spec.refinement.kl_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM
    if uniform and not (spec_needs_grams(spec) or wants_kl):
        return Measured(calibration=None, tokens=None, sensitivity=None)
    options = spec.calibration
    calib = build_calibration_set(loaded.tokenizer, text_file=None if options.text is None else Path(options.text),
                                  num_samples=options.num_samples, seq_len=options.seq_len, seed=options.seed)
    record = {"sha256": calib.sha256, "source": calib.source, "num_samples": options.num_samples,
              "seq_len": options.seq_len, "seed": options.seed}
    if uniform:
        return Measured(calibration=record if spec_needs_grams(spec) else None, tokens=calib.tokens,
                        sensitivity=None)
    importance = None
    if spec.quantization.format_names is not None or salience_width_errors(
            spec, resolve_metric(spec.sensitivity.metric.value, loaded.kind, spec.quantization.target.value)):
        linear = {name: m for name, m in {**units, **(head or {})}.items() if isinstance(m, nn.Linear)}
        importance = cached_importance(loaded, linear, calib, cache, lambda: input_energy(
            loaded.model, linear, list(torch.split(calib.tokens, 1)), on_progress=on_progress,
            should_stop=should_stop))
    sensitivity, cache_state = measure(spec, loaded, units, calib, on_progress, should_stop, cache, importance)
    if head:
        of_head, _ = measure(spec, loaded, head, calib, on_progress, should_stop, cache, importance)
        sensitivity = dataclasses.replace(sensitivity, units=sensitivity.units + of_head.units,
                                          seconds=sensitivity.seconds + of_head.seconds,
                                          warnings=sensitivity.warnings + of_head.warnings)
    return Measured(calibration={**record, **cache_state}, tokens=calib.tokens,
                    sensitivity=sensitivity, importance=importance)


def measure_sensitivity(spec: JobSpec, *, on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                        use_cache: bool = True) -> SensitivityResult:
    """Steps 1-4 only: load, calibrate and compute the predicted loss increase per (unit, bit width)."""
    cache = SensitivityCache(None) if use_cache else None
    loaded = load_model(spec.model)
    measured = calibrate_and_measure(spec, loaded, find_units(loaded.model), on_progress, should_stop, cache)
    if measured.sensitivity is None:
        raise BitplanError("a sensitivity pass needs candidate bit widths, not uniform bits")
    return measured.sensitivity


def refine_plans(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear], sizes: Sizes, measured: Measured,
                 plans: list[Plan], quantized: list[Quantized], on_progress: ProgressFn | None,
                 should_stop: StopFn | None) -> tuple[list[Plan], list[Quantized], list[dict[str, Any] | None]]:
    """Step 7: each plan re-solved with its block KL shares (:func:`bitplan.job.refine.refine_allocation`)."""
    assert measured.sensitivity is not None and measured.tokens is not None  # checked by the caller
    numel = sum(m.weight.numel() for m in units.values())
    windows = measured.tokens[-2 * spec.refinement.kl_refine_windows:]
    new_plans, new_quantized, reports = [], [], []
    for plan, each in zip(plans, quantized, strict=True):
        solve = functools.partial(_solve_bits, spec, sizes, budget_bytes=plan.budget_bytes, numel=numel)
        refinement = refine_allocation(
            loaded.model, units, find_block_stack(loaded.model)[0], measured.sensitivity, plan.bits, each, windows,
            solve=solve, on_progress=on_progress, should_stop=should_stop,
            quantize=lambda bits: quantize_plans(spec, loaded, units, bits, measured.tokens, None, should_stop))
        new_plans.append(Plan(bits=refinement.chosen, budget_bits_per_weight=plan.budget_bits_per_weight,
                              budget_bytes=plan.budget_bytes, solver=plan.solver, seconds=plan.seconds))
        new_quantized.append(refinement.quantized)
        reports.append(refinement.report)
    return new_plans, new_quantized, reports


def _solve_bits(spec: JobSpec, sizes: Sizes, sensitivity: SensitivityResult, *, budget_bytes: int,
                numel: int) -> dict[str, int]:
    return solve_plan(spec, sizes, sensitivity, budget_bytes=budget_bytes, numel=numel).bits


def source_float_dtype(loaded: LoadedModel) -> torch.dtype:
    """The dtype the source stores its float tensors in: its config's ``torch_dtype`` when that is fp16 or bf16,
    fp16 for a GGUF (whose float tensors are fp16/fp32 or themselves quantized), else fp32."""
    if loaded.source_format == "gguf":
        return torch.float16
    folder = loaded.source_path if loaded.source_path.is_dir() else loaded.source_path.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    declared = config.get("torch_dtype") or config.get("dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(declared), torch.float32)


def run_record(spec: JobSpec, loaded: LoadedModel, plan: Plan, measured: Measured,
               refinement: dict[str, Any] | None, quality: QualityReport | None = None) -> RunRecord:
    """What the manifest says of how this artifact was made."""
    sensitivity = measured.sensitivity
    if plan.budget_bytes is None:
        budget: dict[str, Any] = {"uniform_bits": spec.budget.uniform_bits}
    else:
        budget = {"bits_per_weight": plan.budget_bits_per_weight, "bytes": plan.budget_bytes,
                  **({} if spec.budget.file_bytes is None else {"file_bytes": spec.budget.file_bytes})}
    return RunRecord(
        source=SourceRecord(reference=spec.model, format=loaded.source_format, sha256=loaded.source_sha256),
        budget=budget, group_size=spec.quantization.group_size, candidate_bits=list(spec.widths),
        tie_fused=spec.allocation.tie_fused, pinned=[list(p) for p in spec.allocation.pinned],
        solver=plan.solver,
        sensitivity=SensitivityRecord(metric=None if sensitivity is None else sensitivity.metric.value,
                                      warnings=[] if sensitivity is None else list(sensitivity.warnings)),
        calibration=measured.calibration, quantizer=QUANTIZER_LABELS[spec.quantization.quantizer.value],
        mix_groups=spec.quantization.mix_groups, kl_refinement=refinement,
        quality=None if quality is None else quality.to_json(), job=spec.to_dict(),
        formats=None if spec.quantization.format_names is None else list(spec.quantization.format_names))


def write_run(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear], plan: Plan, measured: Measured,
              quantized: Quantized, out_dir: Path, refinement: dict[str, Any] | None, timings: dict[str, float],
              on_progress: ProgressFn | None, sizes: Sizes | None = None, latency: LatencyPlan | None = None,
              head: tuple[str, ...] = ()) -> RunResult:
    """Step 8: measure one plan's quality, pack and write its artifact (with its allocation problem, the
    frontier's source, when it was solved), measure its KL divergence, report it."""
    started = time.perf_counter()
    quality = None
    checks = measured.heldout is not None or (spec.refinement.kl_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM)
    replacements = {name: decode_weight(q) for name, q in quantized.items()} if checks else {}  # both checks
    if measured.heldout is not None:
        quality = measure_quality(loaded.model, units, replacements, measured.heldout[0], text=measured.heldout[1])
    quality_s = {"quality": round(time.perf_counter() - started, 3)} if quality is not None else {}
    if on_progress is not None and quality is not None:
        on_progress(Stage.QUALITY, 1, 1)
    latency_report = None if latency is None or plan.latency_ms is None else {
        "predicted_ms_per_token": plan.latency_ms, "budget_ms_per_token": latency.budget_ms,
        "predicted_prefill_ms_per_token": plan.prefill_ms, "prefill_budget_ms_per_token": latency.prefill_budget_ms,
        "table": latency.table}
    record = dataclasses.replace(run_record(spec, loaded, plan, measured, refinement, quality), latency=latency_report)
    started = time.perf_counter()
    written = write_artifact(out_dir, model=loaded.model, tokenizer=loaded.tokenizer, kind=loaded.kind,
                             quantized=quantized, run=record, float_dtype=source_float_dtype(loaded),
                             formats={name: unit_format(spec, plan, name) for name in plan.bits})
    if sizes is not None and measured.sensitivity is not None and plan.budget_bytes is not None:
        problem = job_problem(spec, sizes, measured.sensitivity, plan.budget_bytes, latency)
        fixed = None if latency is None else {"latency_fixed_ms": latency.fixed_ms,
                                              "prefill_fixed_ms": latency.prefill_fixed_ms}
        write_problem(written.path, problem_document(problem, option_labels(spec, sizes),
                                                     sum(m.weight.numel() for m in units.values()), fixed))
        _, written = listed(written, [PROBLEM_FILE])
    stage_times = {"write": round(time.perf_counter() - started, 3)}
    if on_progress is not None:
        on_progress(Stage.WRITE, 1, 1)
    target, written = write_target(spec, written, measured)
    stage_times["write"] = round(time.perf_counter() - started, 3)
    if latency_report is not None:
        latency_report, stage_times["latency check"] = measure_latency(written.path / GGUF_FILE, latency_report)
        if on_progress is not None:
            on_progress(Stage.LATENCY_CHECK, 1, 1)
    kl, stage_times["kl"] = measure_kl(spec, loaded, units, replacements, measured.tokens)
    if on_progress is not None:
        on_progress(Stage.KL_CHECK, 1, 1)
    allocation_s = {} if plan.budget_bytes is None else {"allocation": plan.seconds}
    return result_of(spec, written, plan, record, {**timings, **allocation_s, **quality_s, **stage_times}, kl,
                   quantized, target, latency_report, head)
















__all__ = ["GGUF_FILE", "RunResult", "calibrate_and_measure", "head_units", "measure_sensitivity", "resolve_metric",
           "run_budgets", "run_pipeline"]
