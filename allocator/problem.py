"""The allocation problem: a multiple-choice knapsack over quantization units.

Each unit (a layer, a tensor or a group) has options (a bit width, ...) with a size in bytes (scales and zero
points counted), a predicted distortion and optionally a latency. Pick one option per unit to minimize total
distortion subject to a bytes budget (and optionally a latency budget). Units that share a ``tie`` label must
pick the same option index.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum


class SolverStatus(str, Enum):
    """Outcome of a solve, as it crosses the API."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"  # a solution with a gap to the bound (time limit reached)
    INFEASIBLE = "infeasible"
    TIME_LIMIT = "time_limit"  # no solution found within the time limit


@dataclass(frozen=True)
class Option:
    """One choice for a unit: its bit width, exact size in bytes and predicted distortion."""

    bits: int
    bytes: float
    distortion: float
    latency: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bytes) and self.bytes >= 0):
            raise ValueError(f"option bytes must be a finite number >= 0, got {self.bytes}")
        if not math.isfinite(self.distortion):
            raise ValueError(f"option distortion must be finite, got {self.distortion}")
        if self.latency is not None and not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"option latency must be a finite number >= 0, got {self.latency}")


@dataclass(frozen=True)
class Unit:
    """A unit to allocate: a name, its options, and an optional tie label shared with fused units."""

    name: str
    options: tuple[Option, ...]
    tie: str | None = None

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"unit {self.name!r} has no options")


@dataclass(frozen=True)
class Budget:
    """Upper limits; ``None`` means unconstrained."""

    bytes: float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        if self.bytes is None and self.latency is None:
            raise ValueError("a budget needs 'bytes' or 'latency' (or both)")
        for name, value in (("bytes", self.bytes), ("latency", self.latency)):
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
        if self.budget.latency is not None:
            missing = [u.name for u in self.units if any(o.latency is None for o in u.options)]
            if missing:
                raise ValueError(f"a latency budget needs a latency on every option; missing on {missing[:5]}")

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

    def block_totals(self, block: list[int]) -> tuple[list[float], list[float]]:
        """Bytes and distortion of each option index summed over the units of one block."""
        n_options = len(self.units[block[0]].options)
        sizes = [sum(self.units[i].options[k].bytes for i in block) for k in range(n_options)]
        costs = [sum(self.units[i].options[k].distortion for i in block) for k in range(n_options)]
        return sizes, costs

    def bytes_range(self) -> tuple[float, float]:
        """Smallest and largest total bytes any allocation can reach (ties respected)."""
        low = high = 0.0
        for block in self.blocks():
            sizes, _ = self.block_totals(block)
            low += min(sizes)
            high += max(sizes)
        return low, high

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
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def without_solution(cls, problem: AllocationProblem, *, status: SolverStatus, solver: str, solve_s: float,
                         message: str) -> Allocation:
        """An answer with no choice (infeasible, or nothing found in time), naming the smallest feasible size."""
        return cls(status=status, choice=(), objective=None, lower_bound=None, bytes=None, latency=None,
                   solve_s=solve_s, solver=solver, message=message, min_feasible_bytes=problem.bytes_range()[0])

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
        result.update(self.extra)
        return result


def reject_infeasible_budget(problem: AllocationProblem, solver: str, started: float) -> Allocation | None:
    """Return an ``infeasible`` answer, with the smallest feasible budget, before any solve."""
    low, _ = problem.bytes_range()
    if problem.budget.bytes is not None and problem.budget.bytes < low - 1e-9:
        return Allocation.without_solution(
            problem, status=SolverStatus.INFEASIBLE, solver=solver, solve_s=time.perf_counter() - started,
            message=f"budget of {problem.budget.bytes:g} bytes is below the smallest achievable size {low:g} bytes")
    return None
