"""The whole job as plain calls: a :class:`~bitplan.spec.JobSpec` -> packed, loadable artifacts and a report.

:func:`run_budgets` is the one pipeline; its docstring numbers the steps, each one call into its own module
(``planning``, ``quantize``, ``refine``, ``artifact``). It knows nothing of HTTP or queues.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.artifact import WrittenArtifact, write_artifact
from bitplan.calibration import build_calibration_set
from bitplan.errors import BitplanError, BudgetError, ModelReferenceError, SpecError
from bitplan.exports.gguf_file import IMATRIX_FILE
from bitplan.frontier import PROBLEM_FILE, problem_document, write_problem
from bitplan.hashing import sha256_file
from bitplan.manifest import MANIFEST, RunRecord, SensitivityRecord, SourceRecord, write_manifest
from bitplan.models import LoadedModel, ModelKind, load_model
from bitplan.planning import (
    LatencyPlan,
    Plan,
    Sizes,
    budgets_in_bytes,
    job_problem,
    latency_plan,
    make_plans,
    option_labels,
    solve_plan,
    unit_sizes,
)
from bitplan.quality import QualityReport, heldout_windows, measure_quality
from bitplan.quantize import Importance, Quantized, measure_kl, quantize_plans, spec_needs_grams
from bitplan.quantizer.formats import GgmlWeight, decode_weight, encoded_bytes
from bitplan.quantizer.methods import QUANTIZER_LABELS
from bitplan.refine import refine_allocation
from bitplan.sensitivity import SensitivityResult
from bitplan.sensitivity.activations import StopFn
from bitplan.sensitivity.cache import SensitivityCache
from bitplan.sensitivity.importance import input_energy
from bitplan.sensitivity_pass import cached_importance, measure, resolve_metric, salience_width_errors
from bitplan.spec import JobSpec
from bitplan.stages import ProgressFn, Stage
from bitplan.units import find_block_stack, find_output_head, find_units, find_untied_embedding

logger = logging.getLogger(__name__)
GGUF_FILE = "model.gguf"  # the gguf target's file, beside the manifest
SIDECARS = (IMATRIX_FILE,)  # files a target writes beside what the runtime loads (not in file_bytes)


@dataclass
class RunResult:
    """The report of one run; ``to_json`` is the CLI's JSON contract."""

    artifact: str
    bits_per_weight: float
    bytes: int
    status: str
    objective: float | None
    lower_bound: float | None
    units: list[dict[str, Any]]
    model: str
    metric: str | None
    budget: dict[str, Any]
    calibration: dict[str, Any] | None
    manifest_sha256: str
    timings_s: dict[str, float]
    predicted_bytes: int
    warnings: list[str]
    kl_divergence: float | None = None  # mean per-token KL(float || quantized) on calibration windows (nats)
    quality: dict[str, Any] | None = None  # bitplan.quality.QualityReport on held-back windows (language models)
    file_bits_per_parameter: float | None = None  # the whole artifact folder per parameter of the model
    target: str = "bitplan"
    files: list[dict[str, Any]] | None = None  # what the target runs from: name (under artifact), bytes, sha256
    file_bytes: int | None = None  # bytes of the target's file(s): the GGUF file, or the whole packed folder
    latency: dict[str, Any] | None = None  # predicted (and measured) decode ms per token, the table used
    head: list[dict[str, Any]] | None = None  # the output head's (and an untied token embedding's) format and bytes,
    # when a whole-file budget chose them

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measured:
    """What steps 3-4 give: the calibration record and tokens, and the sensitivities (``None`` when uniform)."""

    calibration: dict[str, Any] | None
    tokens: torch.Tensor | None
    sensitivity: SensitivityResult | None
    heldout: tuple[torch.Tensor, str] | None = None  # held-back windows for the quality report, and their text
    importance: Importance | None = None  # per-column input energy (formats' encoders), when the job has formats


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
                should_stop: StopFn | None = None, use_cache: bool = True, cache_dir: Path | None = None
                ) -> list[RunResult]:
    """Quantize ``spec.model`` at each of its budgets (``out_dirs[i]`` for budget ``i``), measuring once.

    1. Load the model reference (bundled id, HF folder, .safetensors, .gguf).
    2. Find the units (linear layers in the blocks) and check every budget against the achievable range.
    3. Build the calibration set (text file or built-in text) and record its hash.
    4. Compute the sensitivity: predicted loss increase per (unit, bit width), from the cache when measured before.
    5. Plan each budget: bits per unit by the allocator (a uniform baseline is a trivial plan).
    6. Quantize every unit of every plan (RTN, GPTQ, with or without salience; one Gram pass for all).
    7. Optionally re-solve each plan with the block KL shares the quantized model measures.
    8. Measure each plan's quality on held-back windows, pack and write its artifact atomically, measure its KL
       divergence on calibration windows, and report; sizes come from the files.

    ``use_cache``: reuse sensitivities measured before, kept under ``cache_dir`` (default ``$BITPLAN_CACHE_DIR``
    or ``~/.cache/bitplan``).
    """
    if len(out_dirs) != spec.budgets:
        raise BitplanError(f"give one output directory per budget: {spec.budgets} budgets, {len(out_dirs)} "
                           f"directories")
    cache = SensitivityCache(cache_dir) if use_cache else None
    from bitplan.streamed_job import run_streamed_gguf, streams

    if streams(spec):  # a model over 2 GiB in float32 to a GGUF: every stage one block at a time
        return run_streamed_gguf(spec, out_dirs=out_dirs, on_progress=on_progress, cache=cache)
    clock = Clock()
    if on_progress is not None:
        on_progress(Stage.LOAD, 0, 1)
    loaded = load_model(spec.model)  # 1
    clock.lap("load")
    if on_progress is not None:
        on_progress(Stage.LOAD, 1, 1)
    units = find_units(loaded.model)  # 2
    if not units:
        raise ModelReferenceError(f"{spec.model!r} has no linear layers inside its transformer blocks to quantize")
    if spec.quantization.target.value == "gguf":
        check_gguf_source(spec, loaded)
    head = head_units(spec, loaded)
    planned = {**units, **head}  # what the budget counts and the allocator chooses for
    sizes = unit_sizes(planned, spec.widths, spec.quantization.group_size, spec.quantization.format_names,
                       spec.quantization.target.value)
    numel = sum(m.weight.numel() for m in planned.values())
    overhead = None
    if spec.budget.file_bytes is not None:
        from bitplan.exports.gguf_file import file_overhead

        overhead = file_overhead(loaded.source_path, list(planned))
    budgets = [None] if spec.budget.uniform_bits is not None else budgets_in_bytes(spec, sizes, numel, overhead)
    latency = plan_latency(spec, loaded, units, sizes, on_progress)
    clock.lap("plan")
    measured = calibrate_and_measure(spec, loaded, units, on_progress, should_stop, cache, head)  # 3, 4
    refinement = spec.refinement
    if refinement.quality_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM:
        text = None if refinement.eval_text is None else Path(refinement.eval_text)
        measured.heldout = heldout_windows(loaded.tokenizer, windows=refinement.quality_windows,
                                           seq_len=refinement.quality_seq_len, text_file=text)
    if measured.sensitivity is not None:
        clock.lap("sensitivity")
    plans = make_plans(spec, planned, sizes, measured.sensitivity, budgets, latency)  # 5
    quantized = quantize_plans(spec, loaded, planned, [p.bits if p.formats is None else p.formats for p in plans],
                               measured.tokens, on_progress, should_stop, importance=measured.importance)  # 6
    clock.lap("quantize")
    reports: list[dict[str, Any] | None] = [None] * len(plans)
    if spec.refinement.kl_refine_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM and measured.sensitivity:
        plans, quantized, reports = refine_plans(spec, loaded, planned, sizes, measured, plans, quantized,
                                                 on_progress, should_stop)  # 7
        clock.lap("kl refinement")
    return [write_run(spec, loaded, planned, plan, measured, each, out_dir, report, clock.timings, on_progress, sizes,
                      latency, head=tuple(head))
            for plan, each, out_dir, report in zip(plans, quantized, out_dirs, reports, strict=True)]


def head_units(spec: JobSpec, loaded: LoadedModel) -> dict[str, nn.Module]:
    """The output head, and an untied model's token embedding, as more units to choose a format for: under a
    whole-file budget of the gguf target, which counts their bytes (in a tied model the head is the file's
    ``token_embd``: the embedding and the head are one tensor; in an untied one ``output`` and ``token_embd`` are
    two, each chosen). Under a budget of the block linear layers alone they keep the source's types; with a time
    budget too (the latency table times the block linear layers' types only)."""
    if (spec.quantization.target.value != "gguf" or spec.budget.file_bytes is None or spec.budget.has_time_budget
            or spec.quantization.format_names is None):
        return {}
    return {**find_output_head(loaded.model), **find_untied_embedding(loaded.model)}


def plan_latency(spec: JobSpec, loaded: LoadedModel, units: dict[str, nn.Linear], sizes: Sizes,
                 on_progress: ProgressFn | None) -> LatencyPlan | None:
    """Step 2b, with a latency (decode or prefill) budget: this machine's latency table for the model and the
    candidate GGML types (cached; measured now when missing, or read from ``--latency-table``), and the budgets
    checked against it."""
    if not spec.budget.has_time_budget:
        return None
    from bitplan.latency import latency_table

    names = spec.quantization.format_names or ()
    used = {fmt for options in sizes.values() for fmt in options}
    table_file = None if spec.budget.latency_table is None else Path(spec.budget.latency_table)
    table, source = latency_table(spec.model, loaded.source_sha256, [f for f in names if f in used],
                                  table_file=table_file, on_progress=on_progress, loaded=loaded)
    return latency_plan(table, source, units, sizes, spec.budget.latency_ms_per_token,
                        spec.budget.prefill_ms_per_token)


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
            spec, resolve_metric(spec.sensitivity.metric.value, loaded.kind)):
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
    return Measured(calibration={**record, "sensitivity_cache": cache_state}, tokens=calib.tokens,
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
    """Step 7: each plan re-solved with its block KL shares (:func:`bitplan.refine.refine_allocation`)."""
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


def check_gguf_source(spec: JobSpec, loaded: LoadedModel) -> None:
    """The gguf target takes metadata and tokenizer from a GGUF file or a Hugging Face folder of a supported
    architecture: refused before any heavy work otherwise."""
    if loaded.source_format not in ("gguf", "hf-folder"):
        raise ModelReferenceError(f"the gguf target takes the tokenizer and metadata from a GGUF file or a Hugging "
                                  f"Face folder; {spec.model!r} is a {loaded.source_format} model", param="model")
    if loaded.source_format == "hf-folder":
        from bitplan.exports.gguf_source import open_source

        try:
            open_source(loaded.source_path, {})
        except BitplanError as error:
            raise ModelReferenceError(f"the gguf target cannot be written from {spec.model!r}: {error}",
                                      param="model") from None
        if spec.budget.latency_ms_per_token is not None or spec.budget.prefill_ms_per_token is not None:
            raise SpecError("latency budgets time variants of a GGUF source file; this model is a Hugging Face "
                            "folder (give a size budget, or a GGUF of it)", param="latency_ms_per_token")


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
        _, written = _listed(written, [PROBLEM_FILE])
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
    return _result(spec, written, plan, record, {**timings, **allocation_s, **quality_s, **stage_times}, kl,
                   quantized, target, latency_report, head)


def measure_latency(gguf: Path, report: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The written GGUF's decode time through llama.cpp on this machine (median of interleaved rounds), added to
    the latency report; and the seconds it took."""
    from bitplan.latency import time_files

    started = time.perf_counter()
    (timed,) = time_files([gguf], rounds=3)
    return {**report, "measured_ms_per_token": timed["decode_ms"],
            "measured_prefill_ms_per_token": timed["prefill_ms"]}, round(time.perf_counter() - started, 3)


def write_target(spec: JobSpec, written: WrittenArtifact, measured: Measured | None = None
                 ) -> tuple[list[dict[str, Any]], WrittenArtifact]:
    """The file(s) the target runs from: for ``gguf``, ``model.gguf`` written beside the manifest (each unit's
    GGML blocks copied byte for byte; its block-linear bytes must be the artifact's) with the importance matrix
    its encoders used (``model.imatrix.gguf``, llama.cpp's format: ``llama-quantize --imatrix`` re-quantizes the
    file the way we did), both added to the manifest's checked files, so the service serves them; for
    ``bitplan``, the folder's files. One ``{"name", "bytes", "sha256"}`` row each, and the artifact as it now
    is."""
    folder = written.path
    if spec.quantization.target.value == "gguf":
        from bitplan.exports import export_artifact

        report = export_artifact(folder, format="gguf", out=folder / GGUF_FILE)
        linear = sum(row["bytes"] for row in report.units)
        if linear != written.quantized_bytes:
            raise RuntimeError(f"the GGUF holds {linear} bytes of block weights, the artifact "
                               f"{written.quantized_bytes}")
        limit = spec.budget.file_bytes
        if limit is not None and report.file_bytes > limit:
            raise BudgetError(f"the written GGUF has {report.file_bytes} bytes, over the whole-file budget of "
                              f"{limit}; lower it by {report.file_bytes - limit} bytes", param="file_bytes")
        if measured is None or measured.importance is None or measured.tokens is None:
            return _listed(written, [GGUF_FILE])
        from bitplan.exports.gguf_file import source_model, write_imatrix

        write_imatrix(folder / IMATRIX_FILE, source_model(written.manifest), measured.importance,
                      tokens=int(measured.tokens.numel()), chunk_size=int(measured.tokens.shape[-1]),
                      dataset=str((measured.calibration or {}).get("source", "calibration")))
        return _listed(written, [GGUF_FILE, IMATRIX_FILE])
    if spec.quantization.target.value == "compressed-tensors":
        return _write_compressed_tensors(written)
    files = {**written.manifest.files, MANIFEST: written.manifest_sha256}
    return [{"name": name, "bytes": (folder / name).stat().st_size, "sha256": digest}
            for name, digest in sorted(files.items())], written


def _write_compressed_tensors(written: WrittenArtifact) -> tuple[list[dict[str, Any]], WrittenArtifact]:
    """The compressed-tensors target: ``model.safetensors`` and a ``config.json`` with its
    ``quantization_config`` in the artifact folder itself, so ``from_pretrained(OUT)`` loads it (our loader
    ignores that config entry); both are listed in the manifest. The target's formats divide every layer's
    input width, so nothing is regrouped; its symmetric grids store no zero points, so its layers weigh a little
    less than the artifact's (which keeps an fp16 zero per group)."""
    from bitplan.exports import export_artifact

    folder = written.path
    staging = folder.with_name(f".{folder.name}.compressed-tensors-{uuid.uuid4().hex[:8]}")
    try:
        export_artifact(folder, format="compressed-tensors", out=staging)
        names = ("model.safetensors", "config.json")
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _listed(written, list(names))


def _listed(written: WrittenArtifact, names: list[str]) -> tuple[list[dict[str, Any]], WrittenArtifact]:
    """Add the target's files ``names`` (in the artifact folder) to the manifest's checked files, rewrite it,
    and return their ``{"name", "bytes", "sha256"}`` rows with the artifact as it now is."""
    folder = written.path
    rows = [{"name": name, "bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in names]
    manifest = dataclasses.replace(written.manifest,
                                   files={**written.manifest.files, **{r["name"]: r["sha256"] for r in rows}})
    return rows, dataclasses.replace(written, manifest=manifest, manifest_sha256=write_manifest(folder, manifest))


def _result(spec: JobSpec, written: WrittenArtifact, plan: Plan, record: RunRecord, timings: dict[str, float],
            kl: float | None, quantized: Quantized, files: list[dict[str, Any]],
            latency: dict[str, Any] | None = None, head: tuple[str, ...] = ()) -> RunResult:
    predicted = sum(encoded_bytes(quantized[name]) for name in plan.bits)
    if predicted != written.quantized_bytes:
        raise RuntimeError(f"size model drifted: predicted {predicted} bytes, wrote {written.quantized_bytes}")
    stored = {u.name: u for u in written.manifest.units}
    linear = [name for name in plan.bits if name not in head]  # bytes and bits per weight: the block layers'
    linear_bytes = sum(stored[name].bytes for name in linear)
    linear_numel = sum(stored[name].in_features * stored[name].out_features for name in linear)
    return RunResult(
        artifact=str(written.path), bits_per_weight=8 * linear_bytes / linear_numel, bytes=linear_bytes,
        status=plan.solver.status, objective=plan.solver.objective, lower_bound=plan.solver.lower_bound,
        units=[_unit_json(n, plan.bits[n], quantized[n], unit_format(spec, plan, n)) for n in linear],
        head=[{**_unit_json(n, plan.bits[n], quantized[n], unit_format(spec, plan, n)), "bytes": stored[n].bytes}
              for n in head] or None,
        model=spec.model, metric=record.sensitivity.metric, budget=record.budget, calibration=record.calibration,
        manifest_sha256=written.manifest_sha256, timings_s=timings,
        warnings=record.sensitivity.warnings, kl_divergence=kl, quality=record.quality,
        file_bits_per_parameter=written.manifest.achieved.file_bits_per_parameter,
        target=spec.quantization.target.value, files=files,
        file_bytes=sum(f["bytes"] for f in files if f["name"] not in SIDECARS),
        latency=latency, predicted_bytes=predicted - sum(stored[name].bytes for name in head))


def unit_format(spec: JobSpec, plan: Plan, name: str) -> str:
    """The format a unit was stored in: the plan's choice, or the integer grid of its width and group size."""
    if plan.formats is not None:
        return plan.formats[name]
    symmetric = "-sym" if spec.quantization.quantizer.value == "rtn-symmetric" else ""
    return f"int{plan.bits[name]}-g{spec.quantization.group_size}{symmetric}"


def _unit_json(name: str, bits: int, encoded: Any, fmt: str) -> dict[str, Any]:
    """One entry of the result's ``units``: its format, bits and group size (GGML types: none, blocks are fixed)."""
    if isinstance(encoded, GgmlWeight):
        return {"name": name, "bits": bits, "format": fmt}
    mixed = {} if encoded.group_bits is None else {"group_bits": list(encoded.group_bits)}
    return {"name": name, "bits": bits, "group_size": encoded.group_size, "format": fmt, **mixed}


__all__ = ["RunResult", "calibrate_and_measure", "measure_sensitivity", "resolve_metric", "run_budgets",
           "run_pipeline"]
