"""One entry point for every solver, and the JSON problem format of ``bitplan allocate``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bitplan.allocator.brute_force import solve_brute_force
from bitplan.allocator.convex import solve_convex
from bitplan.allocator.ilp import solve_ilp
from bitplan.allocator.lagrangian import hull_upgrades, solve_hull, solve_lagrangian
from bitplan.allocator.problem import SOLVERS, Allocation, AllocationProblem, Budget, Option, Unit

EXACT_UNIT_LIMIT = 20_000  # above this many units (with no latency budget) auto uses the hull solver


def solve_allocation(problem: AllocationProblem, *, solver: str = "auto", time_limit_s: float = 60.0) -> Allocation:
    """Solve with the named solver. ``auto``: HiGHS (exact) up to ``EXACT_UNIT_LIMIT`` units or whenever a
    latency budget is set, else the Lagrangian hull solver with its gap closed on the open blocks.
    ``baq`` / ``cvxpy``: the convex model ``c * 2^(-2b)`` (closed form / convex program), rounded."""
    if solver == "auto":
        large = len(problem.units) > EXACT_UNIT_LIMIT and not problem.has_time_budget
        solver = "lagrangian" if large else "highs"
    if solver == "highs":
        return with_multiplier(problem, solve_ilp(problem, time_limit_s=time_limit_s))
    if solver == "lagrangian":
        return solve_lagrangian(problem)
    if solver in ("baq", "cvxpy"):
        return with_multiplier(problem, solve_convex(problem, method=solver))
    if solver == "pulp":
        from bitplan.allocator.pulp_backend import solve_pulp

        return with_multiplier(problem, solve_pulp(problem, time_limit_s=time_limit_s))
    if solver == "brute_force":
        return solve_brute_force(problem)
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def with_multiplier(problem: AllocationProblem, allocation: Allocation) -> Allocation:
    """Add the LP price of a byte at this budget (marginal distortion per byte) to a bytes-only answer."""
    if "multiplier" in allocation.extra or not allocation.choice or problem.has_time_budget \
            or problem.budget.bytes is None:
        return allocation
    solution = solve_hull(hull_upgrades(problem), problem.budget.bytes)
    if solution is None:
        return allocation
    return replace(allocation, extra={**allocation.extra, "multiplier": solution.multiplier})


def _optional_int(raw: dict[str, Any], key: str, index: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"units[{index}].{key} must be an integer number of bits, got {value!r}")
    return int(value)


def problem_to_json(problem: AllocationProblem, labels: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The inverse of :func:`problem_from_json` (``bitplan allocate`` reads what this writes); ``labels``: per unit
    name, a ``format`` name for each of its options, kept beside them (the reader ignores it)."""
    units = []
    for unit in problem.units:
        names = (labels or {}).get(unit.name)
        options = [{"bits": o.bits, "bytes": o.bytes, "distortion": o.distortion,
                    **{key: value for key, value in (("latency", o.latency), ("prefill", o.prefill))
                       if value is not None},
                    **({} if names is None else {"format": names[k]})} for k, o in enumerate(unit.options)]
        bounds = {key: value for key, value in (("tie", unit.tie), ("min_bits", unit.min_bits),
                                                ("max_bits", unit.max_bits)) if value is not None}
        units.append({"name": unit.name, "options": options, **bounds})
    budget = {key: getattr(problem.budget, key) for key in ("bytes", "latency", "prefill")
              if getattr(problem.budget, key) is not None}
    return {"units": units, "budget": budget}


def problem_from_json(data: Any) -> AllocationProblem:
    """Build a problem from ``{"units": [{"name", "options": [{"bits", "bytes", "distortion", "latency"?,
    "prefill"?}], "tie"?, "min_bits"?, "max_bits"?, "pin"?}], "budget": {"bytes"?, "latency"?, "prefill"?}}``
    (``pin``: bits the unit must keep), raising ``ValueError`` that says what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("units"), list):
        raise ValueError("problem must be a JSON object with a 'units' list and a 'budget' object")
    if not isinstance(data.get("budget"), dict):
        raise ValueError("problem needs a 'budget' object with 'bytes', 'latency' and/or 'prefill'")
    units = []
    for index, raw in enumerate(data["units"]):
        if not isinstance(raw, dict) or not isinstance(raw.get("options"), list):
            raise ValueError(f"units[{index}] must be an object with an 'options' list")
        try:
            options = tuple(
                Option(bits=int(o["bits"]), bytes=float(o["bytes"]), distortion=float(o["distortion"]),
                       latency=None if o.get("latency") is None else float(o["latency"]),
                       prefill=None if o.get("prefill") is None else float(o["prefill"]))
                for o in raw["options"]
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"units[{index}].options: each needs 'bits', 'bytes' and 'distortion' ({error})") from None
        pin = _optional_int(raw, "pin", index)
        min_bits = pin if pin is not None else _optional_int(raw, "min_bits", index)
        max_bits = pin if pin is not None else _optional_int(raw, "max_bits", index)
        units.append(Unit(name=str(raw.get("name", f"unit{index}")), options=options,
                          tie=None if raw.get("tie") is None else str(raw["tie"]), min_bits=min_bits,
                          max_bits=max_bits))
    budget = data["budget"]
    return AllocationProblem(
        units=tuple(units),
        budget=Budget(bytes=None if budget.get("bytes") is None else float(budget["bytes"]),
                      latency=None if budget.get("latency") is None else float(budget["latency"]),
                      prefill=None if budget.get("prefill") is None else float(budget["prefill"])),
    )
