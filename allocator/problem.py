"""The allocation problem: a multiple-choice knapsack over quantization units.

Each unit (a layer, a tensor or a group) has options (a bit width, ...) with a size in bytes (scales and zero
points counted), a predicted distortion and optionally a latency and a prefill time. Pick one option per unit to
minimize total distortion subject to a bytes budget (and optionally a latency and a prefill budget). Units that
share a ``tie`` label must pick the same option index; ``min_bits`` / ``max_bits`` restrict a unit's options
(equal values pin it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum

SOLVERS = ("auto", "highs", "pulp", "lagrangian", "baq", "cvxpy", "brute_force")


class SolverStatus(str, Enum):
    """Outcome of a solve, as it crosses the API."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"  # a solution with a gap to the bound (time limit reached)
    INFEASIBLE = "infeasible"
    TIME_LIMIT = "time_limit"  # no solution found within the time limit
    UNIFORM = "uniform"  # nothing solved: every unit at one given width (a baseline plan)


@dataclass(frozen=True)
class Option:
    """One choice for a unit: its bit width, exact size in bytes and predicted distortion."""

    bits: int
    bytes: float
    distortion: float
    latency: float | None = None
    prefill: float | None = None  # a second time per token (prefill), constrained by ``Budget.prefill``

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bytes) and self.bytes >= 0):
            raise ValueError(f"option bytes must be a finite number >= 0, got {self.bytes}")
        if not math.isfinite(self.distortion):
            raise ValueError(f"option distortion must be finite, got {self.distortion}")
        for name, value in (("latency", self.latency), ("prefill", self.prefill)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"option {name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class Unit:
    """A unit to allocate: a name, its options, an optional tie label shared with fused units, and optional
    bounds on its bits (``min_bits == max_bits`` pins it)."""

    name: str
    options: tuple[Option, ...]
    tie: str | None = None
    min_bits: int | None = None
    max_bits: int | None = None

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"unit {self.name!r} has no options")
        if not any(self.allowed()):
            bits = sorted({o.bits for o in self.options})
            raise ValueError(f"unit {self.name!r}: no option has bits in [{self.min_bits}, {self.max_bits}] "
                             f"(its options have bits {bits})")

    def allowed(self) -> list[bool]:
        """Which options the bit bounds allow."""
        low = -math.inf if self.min_bits is None else self.min_bits
        high = math.inf if self.max_bits is None else self.max_bits
        return [low <= o.bits <= high for o in self.options]


@dataclass(frozen=True)
class Budget:
    """Upper limits; ``None`` means unconstrained."""

    bytes: float | None = None
    latency: float | None = None
    prefill: float | None = None

    def __post_init__(self) -> None:
        if self.bytes is None and self.latency is None and self.prefill is None:
            raise ValueError("a budget needs 'bytes', 'latency' or 'prefill' (or several)")
        for name, value in (("bytes", self.bytes), ("latency", self.latency), ("prefill", self.prefill)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"budget {name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class AllocationProblem:
    """Units plus budget, validated up front (ties must have equal option counts)."""

    units: tuple[Unit, ...]
    budget: Budget

    def __post_init__(self) -> None:
        if not self.units:
            raise ValueError("the problem has no units")
        for members in self.tie_groups().values():
            counts = {len(self.units[i].options) for i in members}
            if len(counts) > 1:
                names = [self.units[i].name for i in members]
                raise ValueError(f"tied units {names} must have the same number of options, got {sorted(counts)}")
            if not any(self.block_allowed(members)):
                names = [self.units[i].name for i in members]
                raise ValueError(f"tied units {names}: their bit bounds leave no option allowed for all of them")
        for resource in ("latency", "prefill"):
            if getattr(self.budget, resource) is not None:
                missing = [u.name for u in self.units if any(getattr(o, resource) is None for o in u.options)]
                if missing:
                    raise ValueError(f"a {resource} budget needs a {resource} on every option; missing on "
                                     f"{missing[:5]}")

    @property
    def has_time_budget(self) -> bool:
        """Whether a latency or prefill budget constrains the problem (only HiGHS, PuLP and brute force take one)."""
        return self.budget.latency is not None or self.budget.prefill is not None

    def tie_groups(self) -> dict[str, list[int]]:
        """Map each tie label to the indices of its units."""
        groups: dict[str, list[int]] = {}
        for index, unit in enumerate(self.units):
            if unit.tie is not None:
                groups.setdefault(unit.tie, []).append(index)
        return groups

    def blocks(self) -> list[list[int]]:
        """Units that choose together: each tie group, and every untied unit on its own."""
        result = [members for members in self.tie_groups().values()]
        result += [[i] for i, unit in enumerate(self.units) if unit.tie is None]
        return result

    def block_allowed(self, block: list[int]) -> list[bool]:
        """Option indices that every unit of a block allows."""
        masks = [self.units[i].allowed() for i in block]
        return [all(column) for column in zip(*masks, strict=True)]

    def block_totals(self, block: list[int]) -> tuple[list[float], list[float]]:
        """Bytes and distortion of each option index summed over the units of one block (``inf`` where the
        bit bounds exclude the option)."""
        n_options = len(self.units[block[0]].options)
        allowed = self.block_allowed(block)
        sizes = [sum(self.units[i].options[k].bytes for i in block) if allowed[k] else math.inf
                 for k in range(n_options)]
        costs = [sum(self.units[i].options[k].distortion for i in block) if allowed[k] else math.inf
                 for k in range(n_options)]
        return sizes, costs

    def block_latencies(self, block: list[int], resource: str = "latency") -> list[float]:
        """Latency (or ``prefill``) of each option index summed over a block (``inf`` where excluded or unknown)."""
        allowed = self.block_allowed(block)
        result = []
        for k, ok in enumerate(allowed):
            values = [getattr(self.units[i].options[k], resource) for i in block]
            result.append(math.inf if not ok or any(v is None for v in values) else float(sum(values)))  # type: ignore[arg-type]
        return result

    def bytes_range(self) -> tuple[float, float]:
        """Smallest and largest total bytes any allocation can reach (ties and bit bounds respected)."""
        low = high = 0.0
        for block in self.blocks():
            sizes, _ = self.block_totals(block)
            low += min(sizes)
            high += max(s for s in sizes if math.isfinite(s))
        return low, high

    def min_latency(self, resource: str = "latency") -> float | None:
        """Smallest total latency (or ``prefill``) any allocation can reach, ``None`` when some option has none."""
        total = 0.0
        for block in self.blocks():
            total += min(self.block_latencies(block, resource))
        return total if math.isfinite(total) else None

    def prefill_of(self, choice: list[int] | tuple[int, ...]) -> float | None:
        """Total prefill time of a choice, ``None`` when some chosen option has none."""
        values = [unit.options[k].prefill for unit, k in zip(self.units, choice, strict=True)]
        return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]

    def evaluate(self, choice: list[int] | tuple[int, ...]) -> tuple[float, float, float | None]:
        """Objective, bytes and latency of a choice (one option index per unit)."""
        options = [unit.options[k] for unit, k in zip(self.units, choice, strict=True)]
        latency = None
        if all(o.latency is not None for o in options):
            latency = float(sum(o.latency for o in options))  # type: ignore[misc]
        return float(sum(o.distortion for o in options)), float(sum(o.bytes for o in options)), latency


@dataclass(frozen=True)
class Allocation:
    """A solver's answer. ``choice`` holds one option index per unit (empty when none was found)."""

    status: SolverStatus
    choice: tuple[int, ...]
    objective: float | None
    lower_bound: float | None
    bytes: float | None
    latency: float | None
    solve_s: float
    solver: str
    message: str = ""
    min_feasible_bytes: float | None = None
    min_feasible_latency: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def without_solution(cls, problem: AllocationProblem, *, status: SolverStatus, solver: str, solve_s: float,
                         message: str) -> Allocation:
        """An answer with no choice (infeasible, or nothing found in time), naming the smallest feasible size."""
        return cls(status=status, choice=(), objective=None, lower_bound=None, bytes=None, latency=None,
                   solve_s=solve_s, solver=solver, message=message, min_feasible_bytes=problem.bytes_range()[0],
                   min_feasible_latency=problem.min_latency())

    @property
    def gap(self) -> float | None:
        """Relative gap between objective and lower bound (0 when proven optimal)."""
        if self.objective is None or self.lower_bound is None:
            return None
        return max(0.0, self.objective - self.lower_bound) / max(abs(self.objective), 1e-12)

    def to_json(self) -> dict[str, object]:
        """The JSON contract of ``bitplan allocate``."""
        result: dict[str, object] = {
            "status": self.status.value,
            "choice": list(self.choice),
            "objective": self.objective,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "bytes": self.bytes,
            "latency": self.latency,
            "solve_s": self.solve_s,
            "solver": self.solver,
            "message": self.message,
        }
        if self.status is SolverStatus.INFEASIBLE:
            result["min_feasible_bytes"] = self.min_feasible_bytes
            if self.min_feasible_latency is not None:
                result["min_feasible_latency"] = self.min_feasible_latency
        result.update(self.extra)
        return result


def reject_infeasible_budget(problem: AllocationProblem, solver: str, started: float) -> Allocation | None:
    """Return an ``infeasible`` answer, with the smallest feasible budget, before any solve (each limit checked
    on its own; both together can still be infeasible, which the solver then reports)."""
    low, _ = problem.bytes_range()
    messages = []
    if problem.budget.bytes is not None and problem.budget.bytes < low - 1e-9:
        messages.append(f"budget of {problem.budget.bytes:g} bytes is below the smallest achievable size {low:g} "
                        "bytes")
    fastest = problem.min_latency()
    if problem.budget.latency is not None and fastest is not None and problem.budget.latency < fastest - 1e-9:
        messages.append(f"latency budget of {problem.budget.latency:g} is below the smallest achievable latency "
                        f"{fastest:g}")
    quickest = problem.min_latency("prefill")
    if problem.budget.prefill is not None and quickest is not None and problem.budget.prefill < quickest - 1e-9:
        messages.append(f"prefill budget of {problem.budget.prefill:g} is below the smallest achievable prefill time "
                        f"{quickest:g}")
    if messages:
        return Allocation.without_solution(problem, status=SolverStatus.INFEASIBLE, solver=solver,
                                           solve_s=time.perf_counter() - started, message="; ".join(messages))
    return None
