"""Planning: budgets in bytes, the feasibility checks, the allocation problem (ties, pins) and its solution as a
:class:`Plan`. A uniform baseline is a plan too, with status ``uniform``."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from bitplan.allocator import AllocationProblem, Budget, Option, SolverStatus, Unit, solve_allocation
from bitplan.errors import BitplanError, BudgetError
from bitplan.quantizer.formats import FORMATS
from bitplan.quantizer.sizes import quantized_bytes
from bitplan.sensitivity import SensitivityResult
from bitplan.sources.moe import expert_unit
from bitplan.sources.units import unit_shape
from bitplan.targets.manifest import SolverRecord

if TYPE_CHECKING:
    from bitplan.spec import JobSpec

Sizes = dict[str, dict[Any, int]]  # unit name -> option (bit width, or format name) -> exact bytes

FUSED_SUFFIXES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
                  "query": "qkv", "key": "qkv", "value": "qkv"}


UNIFORM = SolverRecord(name=None, status=SolverStatus.UNIFORM.value, objective=None, lower_bound=None, solve_s=None)


@dataclass(frozen=True)
class Plan:
    """Bits per unit for one budget, the budget in bytes (``None`` for a uniform plan) and how it was found."""

    bits: dict[str, int]
    budget_bits_per_weight: float | None
    budget_bytes: int | None
    solver: SolverRecord
    seconds: float = 0.0
    formats: dict[str, str] | None = None  # the format per unit when the job chose among formats
    latency_ms: float | None = None  # predicted decode ms per token (a job with a latency budget)
    prefill_ms: float | None = None  # predicted prefill ms per prompt token (the same jobs)


@dataclass(frozen=True)
class LatencyPlan:
    """Latency budgets in the allocator's terms: each unit's decode (and prefill) milliseconds per token in each
    of its options (from the measured table), the fixed parts, the budgets (``None``: not constrained), and what
    the report says of the table."""

    per_unit: dict[str, dict[Any, float]]
    fixed_ms: float
    budget_ms: float | None
    table: dict[str, Any]
    prefill_per_unit: dict[str, dict[Any, float]] = field(default_factory=dict)
    prefill_fixed_ms: float = 0.0
    prefill_budget_ms: float | None = None

    def _times(self, prefill: bool) -> tuple[dict[str, dict[Any, float]], float]:
        return (self.prefill_per_unit, self.prefill_fixed_ms) if prefill else (self.per_unit, self.fixed_ms)

    def fastest(self, *, prefill: bool = False) -> float:
        per_unit, fixed = self._times(prefill)
        return fixed + sum(min(options.values()) for options in per_unit.values())

    def slowest(self, *, prefill: bool = False) -> float:
        per_unit, fixed = self._times(prefill)
        return fixed + sum(max(options.values()) for options in per_unit.values())

    @property
    def fastest_ms(self) -> float:
        return self.fastest()

    @property
    def slowest_ms(self) -> float:
        return self.slowest()

    def predict(self, choice: dict[str, Any], *, prefill: bool = False) -> float:
        per_unit, fixed = self._times(prefill)
        return fixed + sum(per_unit[name][key] for name, key in choice.items())

    def describe(self) -> str:
        """The budgets, as a refusal names them."""
        parts = [] if self.budget_ms is None else [f"the decode budget of {self.budget_ms:g} ms per token"]
        if self.prefill_budget_ms is not None:
            parts.append(f"the prefill budget of {self.prefill_budget_ms:g} ms per prompt token")
        return " and ".join(parts)


def latency_plan(table: Any, source: str, units: dict[str, nn.Linear], sizes: Sizes, budget_ms: float | None,
                 prefill_budget_ms: float | None = None) -> LatencyPlan:
    """``budget_ms`` (decode) and ``prefill_budget_ms`` against ``table`` (a
    :class:`bitplan.report.latency.LatencyTable`) for these units and options; a budget below the fastest achievable
    time is refused, naming that time."""
    per_unit = {name: {fmt: table.unit_ms(fmt, units[name].weight.numel()) for fmt in sizes[name]}
                for name in sizes}
    prefill = {name: {fmt: table.unit_ms(fmt, units[name].weight.numel(), prefill=True) for fmt in sizes[name]}
               for name in sizes}
    plan = LatencyPlan(per_unit=per_unit, fixed_ms=table.decode_fixed_ms, budget_ms=budget_ms,
                       table={"key": table.key, "source": source, "fingerprint": table.fingerprint,
                              "fit": {k: v for k, v in table.fit.items() if not isinstance(v, list)}},
                       prefill_per_unit=prefill, prefill_fixed_ms=table.prefill_fixed_ms,
                       prefill_budget_ms=prefill_budget_ms)
    for given, is_prefill, what, unit, param in (
            (budget_ms, False, "latency", "ms per token", "latency_ms_per_token"),
            (prefill_budget_ms, True, "prefill", "ms per prompt token", "prefill_ms_per_token")):
        if given is not None and given < plan.fastest(prefill=is_prefill):
            raise BudgetError(f"{what} budget {given:g} {unit} is below the fastest achievable "
                              f"{plan.fastest(prefill=is_prefill):.3f} {unit} (every layer at its fastest candidate "
                              f"format on this machine's measured table); the slowest is "
                              f"{plan.slowest(prefill=is_prefill):.3f}", param=param)
    return plan


def option_key(plan: Plan, name: str) -> Any:
    """The option ``plan`` chose for unit ``name``: its format name, or its bit width."""
    return plan.bits[name] if plan.formats is None else plan.formats[name]


def legal_for_target(target: str, fmt: str, shape: tuple[int, int]) -> bool:
    """Whether ``target`` can hold a ``shape`` weight in ``fmt`` exactly: the format's own rule, and for
    compressed-tensors groups that divide the input width (the library refuses a partial last group)."""
    if not FORMATS[fmt].legal(shape):
        return False
    if target == "compressed-tensors" and FORMATS[fmt].family == "bitplan-int":
        return shape[1] % int(fmt.split("-g")[1].split("-")[0]) == 0
    return True


def unit_sizes(units: dict[str, nn.Linear], bits: tuple[int, ...], group_size: int,
               formats: tuple[str, ...] | None = None, target: str = "bitplan") -> Sizes:
    """Exact bytes of every unit at every candidate bit width, or at every candidate format legal for its shape
    in ``target`` (``formats``). A unit that no candidate format can store is an error naming its shape."""
    if formats is None:
        return {name: {b: quantized_bytes(*unit_shape(m), bits=b, group_size=group_size)
                       for b in bits} for name, m in units.items()}
    sizes: Sizes = {}
    for name, m in units.items():
        shape = unit_shape(m)
        lookup = isinstance(m, nn.Embedding)  # no input activations: no importance vector for the encoder
        sizes[name] = {f: FORMATS[f].bytes(shape) for f in formats if legal_for_target(target, f, shape)
                       and not (lookup and FORMATS[f].needs_importance)}
        if not sizes[name]:
            raise BudgetError(f"no candidate format can store {name} ({shape[0]} x {shape[1]}): "
                              f"{', '.join(formats)} need rows divisible by their block size; add a format with "
                              f"32-weight blocks (Q4_0, Q8_0) or an integer grid (int4-g32)", param="formats")
    return sizes


def budgets_in_bytes(spec: JobSpec, sizes: Sizes, numel: int, file_overhead: int | None = None) -> list[int]:
    """Every budget of ``spec`` in bytes of the budgeted layers, each checked against the achievable range (before
    any heavy work); a whole-file budget less ``file_overhead`` (what the file holds besides those layers)."""
    bits = sorted(spec.allocation.candidate_bits)
    low = sum(min(s.values()) for s in sizes.values())
    high = sum(max(s.values()) for s in sizes.values())
    if spec.budget.file_bytes is not None:
        assert file_overhead is not None, "a whole-file budget needs the file's overhead"
        given = [spec.budget.file_bytes - file_overhead]
    elif not spec.budget.bits_per_weight and spec.budget.bytes is None:  # a time budget alone: size is free
        return [high]
    else:
        given = [int(b * numel / 8) for b in spec.budget.bits_per_weight] or [spec.budget.bytes]
    names = spec.quantization.format_names
    chosen = (f"with bits {bits} and group size {spec.quantization.group_size}" if names is None
              else f"with formats {spec.quantization.formats or ','.join(names)!r}")
    extra = "" if file_overhead is None else (f"; as a whole file {low + file_overhead} to {high + file_overhead} "
                                              "bytes")
    achievable = (f"{chosen} the achievable range is "
                  f"{8 * low / numel:.4f} to {8 * high / numel:.4f} bits per weight ({low} to {high} bytes{extra})")
    for index, budget in enumerate(given):
        if budget < low:
            raise BudgetError(f"budget {spec.budget.describe(index)} is below the smallest achievable size: "
                              f"{achievable}", param=_budget_param(spec))
        if budget > high:
            raise BudgetError(f"budget {spec.budget.describe(index)} is above the largest achievable size: "
                              f"{achievable}; add wider candidates or lower the budget",
                              param=_budget_param(spec))
    return given


def _budget_param(spec: JobSpec) -> str:
    return "file_bytes" if spec.budget.file_bytes is not None else "bits_per_weight"


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
            raise BitplanError(f"pin pattern {pattern!r} matches no unit (units look like {names[0]!r})",
                               param="pinned")
        result.update(dict.fromkeys(matched, bits))
    return result


def option_bits(key: Any) -> int:
    """The bit width an option key stands for: itself, or a format's nominal width (what pins name)."""
    return key if isinstance(key, int) else FORMATS[key].nominal_bits


def allocation_problem(sizes: Sizes, sensitivity: SensitivityResult, bits: tuple[int, ...] | None, budget_bytes: int,
                       *, tie_fused: bool = False, tie_experts: str | bool | None = None,
                       pinned: tuple[tuple[str, int], ...] = (),
                       latency: LatencyPlan | None = None) -> AllocationProblem:
    """One unit per linear layer, one option per candidate bit width (``bits``) or, with ``bits=None``, per key of
    ``sizes[name]`` (its legal formats); fused siblings tied (when they have the same options) and pins applied.
    ``tie_experts``: a layer's routed experts share one format per projection (a runtime storing them as one 3-D
    tensor, llama.cpp's ``ffn_*_exps``); their tie's sensitivity is the sum of its experts'."""
    delta = {u.name: u.delta_loss for u in sensitivity.units}
    pins = pinned_bits(list(sizes), pinned)
    keys = {name: list(bits) if bits is not None else list(sizes[name]) for name in sizes}
    ties = {name: unit_tie(name, tie_fused=tie_fused, tie_experts=tie_experts) for name in sizes}
    options_of_tie: dict[str, set[tuple[Any, ...]]] = {}
    for name, tie in ties.items():
        if tie is not None:
            options_of_tie.setdefault(tie, set()).add(tuple(keys[name]))
    return AllocationProblem(
        units=tuple(Unit(name=name, options=tuple(Option(bits=option_bits(k), bytes=float(sizes[name][k]),
                                                         distortion=float(delta[name][k]),
                                                         latency=None if latency is None else latency.per_unit[name][k],
                                                         prefill=None if latency is None
                                                         else latency.prefill_per_unit[name][k])
                                                  for k in keys[name]),
                         tie=ties[name] if ties[name] is not None and len(options_of_tie[ties[name]]) == 1 else None,
                         min_bits=pins.get(name), max_bits=pins.get(name))
                    for name in sizes),
        budget=Budget(bytes=float(budget_bytes),
                      latency=None if latency is None or latency.budget_ms is None
                      else max(0.0, latency.budget_ms - latency.fixed_ms),
                      prefill=None if latency is None or latency.prefill_budget_ms is None
                      else max(0.0, latency.prefill_budget_ms - latency.prefill_fixed_ms)),
    )


def job_problem(spec: JobSpec, sizes: Sizes, sensitivity: SensitivityResult, budget_bytes: int,
                latency: LatencyPlan | None = None) -> AllocationProblem:
    """The allocation problem ``spec`` solves at ``budget_bytes``: its widths or formats, ties, pins and latency."""
    formats = spec.quantization.format_names
    return allocation_problem(sizes, sensitivity, spec.widths if formats is None else None, budget_bytes,
                              tie_fused=spec.allocation.tie_fused, tie_experts=stacks_experts(spec),
                              pinned=spec.allocation.pinned, latency=latency)


def stacks_experts(spec: JobSpec) -> str | None:
    """How ``spec``'s target ties the routed experts: ``"projection"`` where it stores a layer's as one tensor per
    projection (GGUF: one type each), ``"model"`` where its loader reads every routed expert of the model with one
    scheme (compressed-tensors: transformers' ``get_experts_scheme`` resolves one config group for all of them,
    and vLLM's fused MoE kernel runs a layer's with one), ``None`` where each expert stands apart (our packed
    folder)."""
    return {"gguf": "projection", "compressed-tensors": "model"}.get(str(getattr(spec.quantization.target, "value",
                                                                                  spec.quantization.target)))


ROUTED_EXPERTS = "every routed expert"  # the tie label of a model's experts under one format


def unit_tie(name: str, *, tie_fused: bool, tie_experts: str | bool | None) -> str | None:
    """The tie label of unit ``name``: its expert stack's (``tie_experts``: per projection; every expert of its
    layer with ``"layer"``; every routed expert of the model with ``"model"``), else its fused siblings'
    (``tie_fused``), else ``None``."""
    expert = expert_unit(name) if tie_experts else None
    if expert is not None:
        return {"layer": f"{expert.stack}.*", "model": ROUTED_EXPERTS}.get(str(tie_experts), expert.tie)
    return fused_tie(name) if tie_fused else None


def option_labels(spec: JobSpec, sizes: Sizes) -> dict[str, list[str]] | None:
    """Per unit the format name of each option of :func:`job_problem` (``None`` without formats)."""
    return None if spec.quantization.format_names is None else {name: list(s) for name, s in sizes.items()}


def solve_plan(spec: JobSpec, sizes: Sizes, sensitivity: SensitivityResult, *, budget_bytes: int, numel: int,
               bits_per_weight: float | None = None, latency: LatencyPlan | None = None) -> Plan:
    """Bits per unit within ``budget_bytes`` under ``sensitivity``'s predictions (``spec``'s ties and pins); a
    clear error when no allocation exists."""
    started = time.perf_counter()
    allocation = spec.allocation
    formats = spec.quantization.format_names
    problem = job_problem(spec, sizes, sensitivity, budget_bytes, latency)
    solved = solve_allocation(problem, solver=allocation.solver.value, time_limit_s=allocation.time_limit_s)
    if solved.status in (SolverStatus.INFEASIBLE, SolverStatus.TIME_LIMIT):
        smallest = "" if solved.min_feasible_bytes is None or latency is not None else (
            f" (with these pins the smallest achievable budget is "
            f"{8 * solved.min_feasible_bytes / numel:.4f} bits per weight)")
        both = "" if latency is None else (f" (the size budget and {latency.describe()} cannot all be met: "
                                           "loosen one)")
        raise BudgetError(f"allocation failed ({solved.status.value}): {solved.message}{smallest}{both}",
                          param=spec.budget.time_param if latency is not None else "bits_per_weight")
    bits = {unit.name: unit.options[k].bits for unit, k in zip(problem.units, solved.choice, strict=True)}
    chosen = None if formats is None else {unit.name: list(sizes[unit.name])[k]
                                           for unit, k in zip(problem.units, solved.choice, strict=True)}
    record = SolverRecord(name=solved.solver, status=solved.status.value, objective=solved.objective,
                          lower_bound=solved.lower_bound, solve_s=solved.solve_s)
    choice = chosen if chosen is not None else bits
    predicted = None if latency is None else latency.predict(choice)
    prefill = None if latency is None else latency.predict(choice, prefill=True)
    return Plan(bits=bits, budget_bits_per_weight=bits_per_weight, budget_bytes=budget_bytes, solver=record,
                seconds=round(time.perf_counter() - started, 3), formats=chosen, latency_ms=predicted,
                prefill_ms=prefill)


def uniform_plan(spec: JobSpec, units: dict[str, nn.Linear]) -> Plan:
    """Every unit at ``spec``'s uniform width."""
    width = spec.budget.uniform_bits
    if width is None:
        raise BitplanError("a uniform plan needs uniform bits")
    return Plan(bits=dict.fromkeys(units, width), budget_bits_per_weight=None, budget_bytes=None, solver=UNIFORM)


def make_plans(spec: JobSpec, units: dict[str, nn.Linear], sizes: Sizes, sensitivity: SensitivityResult | None,
               budgets: list[int], latency: LatencyPlan | None = None) -> list[Plan]:
    """One plan per budget of ``spec`` (the uniform plan when it has uniform bits), each under ``latency``."""
    if spec.budget.uniform_bits is not None or sensitivity is None:
        return [uniform_plan(spec, units)]
    numel = sum(m.weight.numel() for m in units.values())
    per_budget = list(spec.budget.bits_per_weight) or [None]
    return [solve_plan(spec, sizes, sensitivity, budget_bytes=budget, numel=numel, bits_per_weight=bpw,
                       latency=latency) for bpw, budget in zip(per_budget, budgets, strict=True)]
