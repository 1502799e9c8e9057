"""The whole job as plain calls: model reference + budget -> packed, loadable artifact and a report."""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from allocator import AllocationProblem, Budget, Option, SolverStatus, Unit, solve_allocation
from bitplan.artifact import write_artifact
from bitplan.calibration import build_calibration_set
from bitplan.errors import BitplanError, BudgetError
from bitplan.models import LoadedModel, ModelKind, causal_lm_loss, load_model, use_eager_attention
from bitplan.refine import refine_allocation
from bitplan.units import find_block_stack, find_units
from quantizer.methods import QUANTIZER_LABELS, QUANTIZERS, needs_gram, quantize_unit
from quantizer.rtn import dequantize_weight
from quantizer.sizes import quantized_bytes, stored_bytes
from sensitivity import HutchinsonConfig, Metric, SensitivityResult, compute_sensitivity
from sensitivity.activations import StopFn, check_stop
from sensitivity.api import NEEDS_LOSS, SECOND_ORDER_HVP_METHODS
from sensitivity.blockwise import block_grams
from sensitivity.cache import SensitivityCache, cache_key
from sensitivity.kl import output_kl
from sensitivity.token_fisher import DEFAULT_ERROR_BYTES

logger = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]
METRIC_CHOICES = ("auto",) + tuple(m.value for m in Metric)


@dataclass(frozen=True)
class RunConfig:
    """What to quantize and under which budget. Exactly one of ``bits_per_weight``, ``budget_bytes`` and
    ``uniform_bits`` is set; ``metric="auto"`` is ``token_taylor`` for causal LMs and ``output_error``
    otherwise."""

    model: str
    out_dir: Path
    bits_per_weight: float | None = None
    budget_bytes: int | None = None
    uniform_bits: int | None = None
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128
    metric: str = "auto"
    calibration_text: Path | None = None
    num_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    solver: str = "auto"
    time_limit_s: float = 60.0
    hutchinson: HutchinsonConfig = field(default_factory=HutchinsonConfig)
    tie_fused: bool = False  # q/k/v and gate/up of a block share one bit width (runtimes fuse them)
    pinned: tuple[tuple[str, int], ...] = ()  # (unit name pattern, bits): matching units keep these bits
    kl_windows: int = 2  # calibration windows on which to measure the artifact's KL divergence (0: skip)
    use_cache: bool = True  # reuse sensitivities measured before (same model, calibration, metric, parameters)
    cache_dir: Path | None = None  # default: $BITPLAN_CACHE_DIR or ~/.cache/bitplan
    quantizer: str = "rtn"  # one of quantizer.methods.QUANTIZERS
    mix_groups: bool = False  # column groups of a layer at bits - 1 / bits / bits + 1 within its size (SliM-LLM)
    max_error_bytes: int = DEFAULT_ERROR_BYTES  # token metrics: RTN-error copies held at once (more: fewer passes)
    # > 0: re-solve with each block's measured share of the output KL (bitplan.refine), measured on this many
    # calibration windows; the allocation with the lowest KL on as many other windows is kept (the first included)
    kl_refine_windows: int = 0

    def __post_init__(self) -> None:
        budgets = [self.bits_per_weight, self.budget_bytes, self.uniform_bits]
        if sum(b is not None for b in budgets) != 1:
            raise BitplanError("give exactly one of a bits-per-weight budget, a bytes budget or uniform bits")
        if self.bits_per_weight is not None and not (math.isfinite(self.bits_per_weight) and self.bits_per_weight > 0):
            raise BitplanError(f"bits per weight must be a positive finite number, got {self.bits_per_weight}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise BitplanError(f"a bytes budget must be positive, got {self.budget_bytes}")
        bits = (self.uniform_bits,) if self.uniform_bits is not None else self.candidate_bits
        if not bits or any(not 1 <= b <= 8 for b in bits):
            raise BitplanError(f"bit widths must be between 1 and 8, got {list(bits)}")
        if self.group_size < 1:
            raise BitplanError(f"group size must be a positive number of input columns, got {self.group_size}")
        if self.max_error_bytes < 1:
            raise BitplanError(f"max_error_bytes must be a positive number of bytes, got {self.max_error_bytes}")
        if self.kl_refine_windows < 0 or (self.kl_refine_windows and self.num_samples < 2 * self.kl_refine_windows):
            raise BitplanError(f"KL refinement on {self.kl_refine_windows} windows needs at least "
                               f"{2 * max(self.kl_refine_windows, 1)} calibration samples (num_samples), "
                               f"got {self.num_samples}")
        if self.kl_refine_windows and self.uniform_bits is not None:
            raise BitplanError("KL refinement re-solves an allocation; uniform bits have none to re-solve")
        if self.metric not in METRIC_CHOICES:
            raise BitplanError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRIC_CHOICES)}")
        if self.num_samples < 1 or self.seq_len < 2:
            raise BitplanError(f"need num_samples >= 1 and seq_len >= 2, got {self.num_samples}, {self.seq_len}")
        if self.quantizer not in QUANTIZERS:
            raise BitplanError(f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        for pattern, pin_bits in self.pinned:
            if pin_bits not in bits:
                raise BitplanError(f"pin {pattern}={pin_bits}: {pin_bits} bits is not a candidate width {list(bits)}")

    @property
    def needs_grams(self) -> bool:
        """Whether quantizing needs each unit's calibration input Gram matrix."""
        return needs_gram(self.quantizer) or self.mix_groups


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_metric(name: str, kind: ModelKind) -> Metric:
    if name == "auto":
        return Metric.TOKEN_TAYLOR if kind is ModelKind.CAUSAL_LM else Metric.OUTPUT_ERROR
    metric = Metric(name)
    if metric in NEEDS_LOSS and kind is not ModelKind.CAUSAL_LM:
        usable = sorted(m.value for m in Metric if m not in NEEDS_LOSS)
        raise BitplanError(f"metric {name!r} needs a language-model loss; this {kind.value} model supports "
                           f"{', '.join(repr(m) for m in usable)}")
    return metric


def unit_sizes(units: dict[str, nn.Linear], bits: tuple[int, ...], group_size: int) -> dict[str, dict[int, int]]:
    """Exact bytes of every unit at every candidate bit width."""
    return {name: {b: quantized_bytes(m.out_features, m.in_features, bits=b, group_size=group_size) for b in bits}
            for name, m in units.items()}


def budget_in_bytes(config: RunConfig, sizes: dict[str, dict[int, int]], numel: int) -> int:
    """Turn the budget into bytes, rejecting one outside the achievable range (before any heavy work)."""
    bits = sorted(config.candidate_bits)
    low = sum(s[bits[0]] for s in sizes.values())
    high = sum(s[bits[-1]] for s in sizes.values())
    budget = config.budget_bytes if config.budget_bytes is not None else int(config.bits_per_weight * numel / 8)
    if not low <= budget:
        raise BudgetError(
            f"budget {_describe(config)} is below the smallest achievable size: with bits {bits} and group size "
            f"{config.group_size} the achievable range is {8 * low / numel:.4f} to {8 * high / numel:.4f} bits per "
            f"weight ({low} to {high} bytes)")
    if budget > high:
        raise BudgetError(
            f"budget {_describe(config)} is above the largest achievable size: with bits {bits} and group size "
            f"{config.group_size} the achievable range is {8 * low / numel:.4f} to {8 * high / numel:.4f} bits per "
            f"weight ({low} to {high} bytes); raise the largest candidate bit width or lower the budget")
    return budget


def check_budget_coarsely(config: RunConfig) -> None:
    """Reject a bits-per-weight budget below ``min bits + 32 / group size`` (one fp16 scale and zero per full
    group) or above ``max bits + 32`` (a group of one weight) before loading anything: no allocation can be
    smaller, or larger."""
    if config.bits_per_weight is None:
        return
    floor = min(config.candidate_bits) + 32 / config.group_size
    if config.bits_per_weight < floor:
        raise BudgetError(
            f"budget {_describe(config)} is below the smallest achievable size: with bits "
            f"{sorted(config.candidate_bits)} and group size {config.group_size} no model goes below {floor:.4f} "
            f"bits per weight (the lowest bit width plus 32 bits of fp16 scale and zero per group)")
    ceiling = max(config.candidate_bits) + 32
    if config.bits_per_weight > ceiling:
        raise BudgetError(
            f"budget {_describe(config)} is above the largest achievable size: with bits "
            f"{sorted(config.candidate_bits)} no model goes above {ceiling} bits per weight; give at most the "
            f"largest candidate width plus its scales and zeros")


def _describe(config: RunConfig) -> str:
    if config.bits_per_weight is not None:
        return f"{config.bits_per_weight:g} bits per weight"
    return f"{config.budget_bytes} bytes"


def _hutchinson_batches(tokens: torch.Tensor, limit: int = 512) -> list[torch.Tensor]:
    """One window of at most ``limit`` tokens: a Hessian-vector product costs ~8 GB per 512 tokens by double
    backward (~3.5 GB by gradient differences) and 5-7 s per probe on two CPU cores."""
    return [tokens[:1, :limit]]


def run_sensitivity(loaded: LoadedModel, units: dict[str, nn.Linear], config: RunConfig, metric: Metric,
                    tokens: torch.Tensor, on_progress: ProgressFn | None,
                    should_stop: StopFn | None = None) -> SensitivityResult:
    """Predicted loss increase per (unit, candidate bit width) under ``metric``."""
    loss_fn = causal_lm_loss if loaded.kind is ModelKind.CAUSAL_LM else None  # metrics that need it were checked
    batches = list(torch.split(tokens, 1))
    if metric is Metric.HUTCHINSON:
        if config.hutchinson.method in SECOND_ORDER_HVP_METHODS:
            use_eager_attention(loaded.model)
        batches = _hutchinson_batches(tokens)
        if config.hutchinson.method == "jvp":  # torch.func cannot start a graph at detached embeddings
            loss_fn = functools.partial(causal_lm_loss, graph_from_embeddings=False)
    return compute_sensitivity(loaded.model, units, batches, metric=metric, bits_options=config.candidate_bits,
                               group_size=config.group_size, loss_fn=loss_fn, hutchinson=config.hutchinson,
                               on_progress=on_progress, should_stop=should_stop,
                               blocks=find_block_stack(loaded.model), max_error_bytes=config.max_error_bytes)


def calibration_record(config: RunConfig, calibration: Any) -> dict[str, Any]:
    """What the manifest says of the calibration set a run used."""
    return {"sha256": calibration.sha256, "source": calibration.source, "num_samples": config.num_samples,
            "seq_len": config.seq_len, "seed": config.seed}


def calibrate_and_measure(config: RunConfig, loaded: LoadedModel, units: dict[str, nn.Linear],
                          on_progress: ProgressFn | None, should_stop: StopFn | None = None
                          ) -> tuple[dict[str, Any], SensitivityResult, torch.Tensor]:
    """Steps 3-4: the calibration set (its manifest record and its tokens) and the sensitivities it gives, from
    the on-disk cache when the same model, calibration tokens, metric and parameters were measured before."""
    metric = _resolve_metric(config.metric, loaded.kind)
    calib = build_calibration_set(loaded.tokenizer, text_file=config.calibration_text,
                                  num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed)
    record = calibration_record(config, calib)
    key = cache_key(model_sha256=loaded.source_sha256, calibration_sha256=calib.sha256, metric=metric.value,
                    bits=sorted(set(config.candidate_bits)), group_size=config.group_size,
                    units=list(units), hutchinson=asdict(config.hutchinson) if metric is Metric.HUTCHINSON else None)
    cache = SensitivityCache(config.cache_dir) if config.use_cache else None
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        logger.info("sensitivity: reusing the cached %s result %s", metric.value, key[:12])
        return {**record, "sensitivity_cache": "hit"}, cached, calib.tokens
    result = run_sensitivity(loaded, units, config, metric, calib.tokens, on_progress, should_stop)
    if cache is not None:
        cache.put(key, result)
    return {**record, "sensitivity_cache": "miss" if cache is not None else "off"}, result, calib.tokens


def measure_sensitivity(config: RunConfig, *, on_progress: ProgressFn | None = None,
                        should_stop: StopFn | None = None) -> SensitivityResult:
    """Steps 1-4 only: load, calibrate and compute the predicted loss increase per (unit, bit width)."""
    loaded = load_model(config.model)
    return calibrate_and_measure(config, loaded, find_units(loaded.model), on_progress, should_stop)[1]


FUSED_SUFFIXES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
                  "query": "qkv", "key": "qkv", "value": "qkv"}


def fused_tie(name: str) -> str | None:
    """The tie label of a unit that runtimes fuse with its siblings (q/k/v, gate/up), else ``None``."""
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{FUSED_SUFFIXES[leaf]}" if leaf in FUSED_SUFFIXES else None


def pinned_bits(names: list[str], pinned: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """Bits per pinned unit from ``(fnmatch pattern, bits)`` pairs (the last matching pattern wins); a pattern
    that matches nothing is an error, since it is most likely a typo."""
    result: dict[str, int] = {}
    for pattern, bits in pinned:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise BitplanError(f"pin pattern {pattern!r} matches no unit (units look like {names[0]!r})")
        result.update(dict.fromkeys(matched, bits))
    return result


def allocation_problem(sizes: dict[str, dict[int, int]], sensitivity: SensitivityResult,
                       bits: tuple[int, ...], budget_bytes: int, *, tie_fused: bool = False,
                       pinned: tuple[tuple[str, int], ...] = ()) -> AllocationProblem:
    """One unit per linear layer, one option per candidate bit width; fused siblings tied and pins applied."""
    delta = {u.name: u.delta_loss for u in sensitivity.units}
    pins = pinned_bits(list(sizes), pinned)
    return AllocationProblem(
        units=tuple(Unit(name=name, options=tuple(Option(bits=b, bytes=float(sizes[name][b]),
                                                         distortion=float(delta[name][b])) for b in bits),
                         tie=fused_tie(name) if tie_fused else None, min_bits=pins.get(name),
                         max_bits=pins.get(name))
                    for name in sizes),
        budget=Budget(bytes=float(budget_bytes)),
    )


def input_grams(loaded: LoadedModel, units: dict[str, nn.Linear], tokens: torch.Tensor,
                on_progress: ProgressFn | None, should_stop: StopFn | None) -> dict[str, torch.Tensor]:
    """Every unit's calibration input Gram matrix ``sum_t x_t x_t^T`` (what GPTQ and salience need), all at once
    (the pipeline itself consumes them block by block, :func:`quantize_units`)."""
    grams = {}
    for block in _grams_by_block(loaded, units, tokens, on_progress, should_stop):
        grams.update(block)
    return {name: grams[name] for name in units}


def _grams_by_block(loaded: LoadedModel, units: dict[str, nn.Linear], tokens: torch.Tensor,
                    on_progress: ProgressFn | None, should_stop: StopFn | None) -> Iterator[dict[str, torch.Tensor]]:
    """Unit name -> input Gram matrix, one transformer block at a time (:func:`sensitivity.blockwise.block_grams`)."""
    for stats in block_grams(loaded.model, find_block_stack(loaded.model), units, list(torch.split(tokens, 1)),
                             on_progress=on_progress, should_stop=should_stop):
        yield {name: entry.gram for name, entry in stats.items()}


def quantize_units(config: RunConfig, loaded: LoadedModel, units: dict[str, nn.Linear],
                   choices: list[dict[str, int]], tokens: torch.Tensor | None, on_progress: ProgressFn | None,
                   should_stop: StopFn | None = None) -> list[dict[str, Any]]:
    """Step 6: every unit at its bit width, for each allocation in ``choices``, with ``config.quantizer``.

    A calibrated quantizer (GPTQ, salience) gets each unit's input Gram matrix; they are collected block by block
    on ``tokens`` and each block's are dropped as soon as its units are quantized for every allocation, so only
    one block's Grams are held.
    """
    quantized: list[dict[str, Any]] = [{} for _ in choices]
    done = 0

    def quantize(names: list[str], grams: dict[str, torch.Tensor] | None) -> None:
        nonlocal done
        for name in names:
            for chosen, into in zip(choices, quantized, strict=True):
                into[name] = quantize_unit(units[name].weight, method=config.quantizer, bits=chosen[name],
                                           group_size=config.group_size, gram=None if grams is None else grams[name],
                                           mix_groups=config.mix_groups)
            done += 1
            if on_progress is not None:
                on_progress("quantize", done, len(units))
            check_stop(should_stop, "quantization")

    if config.needs_grams:
        if tokens is None:
            raise BitplanError(f"quantizer {config.quantizer!r} needs calibration tokens")
        for grams in _grams_by_block(loaded, units, tokens, None, should_stop):
            quantize(list(grams), grams)
    else:
        quantize(list(units), None)
    return [{name: into[name] for name in units} for into in quantized]


def _write(loaded: LoadedModel, quantized: dict[str, Any], manifest_fields: dict[str, Any], out_dir: Path
           ) -> tuple[Any, dict[str, float]]:
    """Step 7: pack and write the artifact."""
    started = time.perf_counter()
    written = write_artifact(out_dir, model=loaded.model, tokenizer=loaded.tokenizer, kind=loaded.kind,
                             quantized=quantized, manifest_fields=manifest_fields)
    return written, {"write": round(time.perf_counter() - started, 3)}


def run_pipeline(config: RunConfig, *, on_progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> RunResult:
    """Quantize ``config.model`` under ``config``'s budget and write the artifact to ``config.out_dir``."""
    budgets = [config.bits_per_weight] if config.bits_per_weight is not None else [None]
    return run_budgets(config, budgets, out_dirs=[config.out_dir], on_progress=on_progress,
                       should_stop=should_stop)[0]


def run_budgets(config: RunConfig, bits_per_weight: list[float | None], *, out_dirs: list[Path],
                on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> list[RunResult]:
    """Quantize ``config.model`` at each budget, computing the sensitivities once.

    ``bits_per_weight[i]`` (``None``: use ``config.budget_bytes`` or ``config.uniform_bits``) is written to
    ``out_dirs[i]``.

    1. Load the model reference (bundled id, HF folder, .safetensors, .gguf).
    2. Find the units (linear layers in the blocks) and check every budget against the achievable range.
    3. Build the calibration set (text file or built-in text) and record its hash.
    4. Compute the sensitivity: predicted loss increase per (unit, bit width).
    5. Allocate bits per unit exactly (integer program) within each budget.
    6. Quantize every unit at its bit width (RTN, GPTQ, with or without salience calibration).
    7. Pack and write the artifact atomically; sizes are measured from the written file.
    """
    if len(bits_per_weight) != len(out_dirs) or not bits_per_weight:
        raise BitplanError("give one output directory per budget")
    configs = [config if b is None else replace(config, bits_per_weight=b) for b in bits_per_weight]
    for each in configs:
        check_budget_coarsely(each)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now

    loaded = load_model(config.model)
    lap("load")
    units = find_units(loaded.model)
    bits = (config.uniform_bits,) if config.uniform_bits is not None else tuple(sorted(set(config.candidate_bits)))
    sizes = unit_sizes(units, bits, config.group_size)
    numel = sum(m.weight.numel() for m in units.values())
    source = {"reference": config.model, "format": loaded.source_format, "sha256": loaded.source_sha256}
    if config.uniform_bits is not None:
        chosen = {name: config.uniform_bits for name in units}
        manifest_fields = {"source": source, "budget": {"uniform_bits": config.uniform_bits},
                           "group_size": config.group_size, "candidate_bits": list(bits),
                           "solver": {"status": "uniform", "objective": None, "lower_bound": None},
                           "sensitivity": {"metric": None, "warnings": []}, "calibration": None,
                           "quantizer": QUANTIZER_LABELS[config.quantizer],
                           "mix_groups": config.mix_groups}
        tokens = None
        if config.needs_grams or (config.kl_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM):
            calibration = build_calibration_set(loaded.tokenizer, text_file=config.calibration_text,
                                                num_samples=config.num_samples, seq_len=config.seq_len,
                                                seed=config.seed)
            tokens = calibration.tokens
            if config.needs_grams:
                manifest_fields["calibration"] = calibration_record(config, calibration)
        [quantized] = quantize_units(config, loaded, units, [chosen], tokens, on_progress, should_stop)
        lap("quantize")
        written, stage_times = _write(loaded, quantized, manifest_fields, out_dirs[0])
        kl, stage_times["kl"] = _measure_kl(config, loaded, units, quantized, tokens)
        return [_result(config, written, chosen, manifest_fields, {**timings, **stage_times}, kl, quantized)]
    budget_bytes = [budget_in_bytes(each, sizes, numel) for each in configs]
    lap("plan")
    calibration, sensitivity, tokens = calibrate_and_measure(config, loaded, units, on_progress, should_stop)
    lap("sensitivity")
    plans = []
    for each, budget in zip(configs, budget_bytes, strict=True):
        started = time.perf_counter()
        chosen, allocation = _solve(config, sizes, sensitivity, bits, budget, numel)
        manifest_fields = {
            "source": source,
            "budget": {"bits_per_weight": each.bits_per_weight, "bytes": budget},
            "group_size": config.group_size, "candidate_bits": list(bits),
            "tie_fused": config.tie_fused, "pinned": [list(p) for p in config.pinned],
            "solver": {"name": allocation.solver, "status": allocation.status.value,
                       "objective": allocation.objective, "lower_bound": allocation.lower_bound,
                       "solve_s": allocation.solve_s},
            "sensitivity": {"metric": sensitivity.metric.value, "warnings": list(sensitivity.warnings)},
            "calibration": calibration, "quantizer": QUANTIZER_LABELS[config.quantizer],
            "mix_groups": config.mix_groups,
        }
        plans.append((chosen, manifest_fields, round(time.perf_counter() - started, 3)))
    started = time.perf_counter()
    all_quantized = quantize_units(config, loaded, units, [chosen for chosen, _, _ in plans], tokens, on_progress,
                                   should_stop)
    quantize_s = round(time.perf_counter() - started, 3)  # one pass for all budgets (the Grams are shared)
    if config.kl_refine_windows > 0 and loaded.kind is ModelKind.CAUSAL_LM:
        for index, (budget, (chosen, manifest_fields, allocation_s)) in enumerate(zip(budget_bytes, plans,
                                                                                      strict=True)):
            refinement = refine_allocation(
                loaded.model, units, find_block_stack(loaded.model)[0], sensitivity, chosen, all_quantized[index],
                tokens[-2 * config.kl_refine_windows:],
                solve=functools.partial(solve_bits, config, sizes, bits=bits, budget=budget, numel=numel),
                quantize=lambda allocations: quantize_units(config, loaded, units, allocations, tokens, None,
                                                            should_stop),
                on_progress=on_progress, should_stop=should_stop)
            plans[index] = (refinement.chosen, {**manifest_fields, "kl_refinement": refinement.report}, allocation_s)
            all_quantized[index] = refinement.quantized
        lap("kl refinement")
    results = []
    for each, out_dir, (chosen, manifest_fields, allocation_s), quantized in zip(
            configs, out_dirs, plans, all_quantized, strict=True):
        written, stage_times = _write(loaded, quantized, manifest_fields, out_dir)
        kl, stage_times["kl"] = _measure_kl(config, loaded, units, quantized, tokens)
        results.append(_result(each, written, chosen, manifest_fields,
                               {**timings, "allocation": allocation_s, "quantize": quantize_s, **stage_times}, kl,
                               quantized))
    return results


def _solve(config: RunConfig, sizes: dict[str, dict[int, int]], sensitivity: SensitivityResult,
           bits: tuple[int, ...], budget: int, numel: int) -> tuple[dict[str, int], Any]:
    """Step 5: bits per unit within ``budget`` bytes, and the solver's result; a clear error when none exists."""
    problem = allocation_problem(sizes, sensitivity, bits, budget, tie_fused=config.tie_fused, pinned=config.pinned)
    allocation = solve_allocation(problem, solver=config.solver, time_limit_s=config.time_limit_s)
    if allocation.status in (SolverStatus.INFEASIBLE, SolverStatus.TIME_LIMIT):
        smallest = "" if allocation.min_feasible_bytes is None else (
            f" (with these pins the smallest achievable budget is "
            f"{8 * allocation.min_feasible_bytes / numel:.4f} bits per weight)")
        raise BudgetError(f"allocation failed ({allocation.status.value}): {allocation.message}{smallest}")
    chosen = {unit.name: unit.options[k].bits for unit, k in zip(problem.units, allocation.choice, strict=True)}
    return chosen, allocation


def solve_bits(config: RunConfig, sizes: dict[str, dict[int, int]], sensitivity: SensitivityResult, *,
               bits: tuple[int, ...], budget: int, numel: int) -> dict[str, int]:
    """Bits per unit within ``budget`` bytes under ``sensitivity``'s predictions (``config``'s ties and pins)."""
    return _solve(config, sizes, sensitivity, bits, budget, numel)[0]


def _measure_kl(config: RunConfig, loaded: LoadedModel, units: dict[str, nn.Linear], quantized: dict[str, Any],
                tokens: torch.Tensor | None) -> tuple[float | None, float]:
    """KL divergence of the quantized model's next-token distribution on the first ``kl_windows`` calibration
    windows (language models only), and the seconds it took."""
    if config.kl_windows <= 0 or tokens is None or loaded.kind is not ModelKind.CAUSAL_LM:
        return None, 0.0
    started = time.perf_counter()
    replacements = {name: dequantize_weight(q) for name, q in quantized.items()}
    kl = output_kl(loaded.model, units, replacements, list(torch.split(tokens[: config.kl_windows], 1)))
    return kl, round(time.perf_counter() - started, 3)


def _result(config: RunConfig, written: Any, chosen: dict[str, int], manifest_fields: dict[str, Any],
            timings: dict[str, float], kl: float | None, quantized: dict[str, Any]) -> RunResult:
    predicted = sum(stored_bytes(quantized[name]) for name in chosen)
    if predicted != written.quantized_bytes:
        raise RuntimeError(f"size model drifted: predicted {predicted} bytes, wrote {written.quantized_bytes}")
    solver = manifest_fields["solver"]
    return RunResult(
        artifact=str(written.path), bits_per_weight=written.bits_per_weight, bytes=written.quantized_bytes,
        status=solver["status"], objective=solver["objective"], lower_bound=solver["lower_bound"],
        units=[{"name": n, "bits": b, "group_size": config.group_size,
                **({} if quantized[n].group_bits is None else {"group_bits": list(quantized[n].group_bits)})}
               for n, b in chosen.items()],
        model=config.model, metric=manifest_fields["sensitivity"]["metric"], budget=manifest_fields["budget"],
        calibration=manifest_fields["calibration"], manifest_sha256=written.manifest_sha256, timings_s=timings,
        predicted_bytes=predicted, warnings=manifest_fields["sensitivity"]["warnings"], kl_divergence=kl,
    )
