"""Exact allocation as a 0/1 integer program, solved by HiGHS through scipy's ``milp`` (HAWQ-V3 style).

Variables ``x[u, k]`` (unit ``u`` takes option ``k``):
    minimize    sum_{u,k} distortion[u,k] * x[u,k]
    subject to  sum_k x[u,k] = 1                      for every unit
                sum_{u,k} bytes[u,k] * x[u,k] <= B     (and the same for latency)
                x[u,k] = x[v,k]                        for tied units u, v
                x[u,k] = 0                             where the unit's bit bounds exclude option k
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from bitplan.allocator.problem import Allocation, AllocationProblem, SolverStatus, reject_infeasible_budget


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to stdout (HiGHS prints debug lines there) to stderr, so that a command's
    stdout stays its JSON."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real file descriptor 1 (embedded interpreters)
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def objective_scale(cost: np.ndarray, n_units: int) -> float:
    """The divisor that brings a typical objective (units x median option cost) to about 1e6.

    HiGHS also stops at an absolute gap (``mip_abs_gap``, 1e-6, which scipy does not expose) and judges dual
    feasibility to an absolute 1e-7: predicted losses are often far smaller (1e-5 in all on a small model), which
    made its "optimal" answers 3e-4 off. Large entries are capped at 1e9 so that no coefficient gets huge."""
    magnitude = np.abs(cost[np.isfinite(cost)])
    positive = magnitude[magnitude > 0]
    if positive.size == 0:
        return 1.0
    typical = float(np.median(positive)) * max(n_units, 1)
    return max(typical / 1e6, float(positive.max()) / 1e9)


def solve_ilp(problem: AllocationProblem, *, time_limit_s: float = 60.0, mip_rel_gap: float = 1e-7) -> Allocation:
    """Solve with HiGHS to a relative gap of ``mip_rel_gap`` (HiGHS' default, 1e-4, calls a solution 1e-4 from
    the bound optimal); on a time limit return the best solution found and its bound."""
    started = time.perf_counter()
    early = reject_infeasible_budget(problem, "highs", started)
    if early is not None:
        return early
    offsets = np.cumsum([0] + [len(u.options) for u in problem.units])
    n_vars = int(offsets[-1])
    cost = np.array([o.distortion for u in problem.units for o in u.options], dtype=float)
    scale = objective_scale(cost, len(problem.units))
    cost = cost / scale
    allowed = np.array([ok for unit in problem.units for ok in unit.allowed()], dtype=float)
    with stdout_to_stderr():
        result = milp(
            cost,
            constraints=_constraints(problem, offsets),
            integrality=np.ones(n_vars),
            bounds=Bounds(0, allowed),
            options={"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap},
        )
    elapsed = time.perf_counter() - started
    if result.x is None:
        status = SolverStatus.INFEASIBLE if result.status == 2 else SolverStatus.TIME_LIMIT
        return Allocation.without_solution(problem, status=status, solver="highs", solve_s=elapsed,
                                           message=str(result.message))
    choice = tuple(int(np.argmax(result.x[offsets[u]:offsets[u + 1]])) for u in range(len(problem.units)))
    objective, used_bytes, latency = problem.evaluate(choice)
    bound = getattr(result, "mip_dual_bound", None)
    lower_bound = objective if bound is None or not np.isfinite(bound) else min(float(bound) * scale, objective)
    status = SolverStatus.OPTIMAL if result.status == 0 else SolverStatus.FEASIBLE
    return Allocation(status=status, choice=choice, objective=objective, lower_bound=lower_bound,
                      bytes=used_bytes, latency=latency, solve_s=elapsed, solver="highs",
                      message=str(result.message))


def _constraints(problem: AllocationProblem, offsets: np.ndarray) -> LinearConstraint:
    """The rows of the program over its 0/1 variables (unit ``u``'s option ``k`` is column ``offsets[u] + k``;
    ``offsets``: ``(units + 1,)``, their cumulative option counts): one option per unit, the byte, latency and
    prefill budgets, and the same option for the units of a tie group (the module docstring)."""
    rows, cols, vals, lower, upper = [], [], [], [], []

    def add_row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(lower)
        for col, val in entries:
            rows.append(row)
            cols.append(col)
            vals.append(val)
        lower.append(lo)
        upper.append(hi)

    for u, unit in enumerate(problem.units):
        add_row([(int(offsets[u]) + k, 1.0) for k in range(len(unit.options))], 1.0, 1.0)
    if problem.budget.bytes is not None:
        add_row([(int(offsets[u]) + k, o.bytes) for u, unit in enumerate(problem.units)
                 for k, o in enumerate(unit.options)], -np.inf, problem.budget.bytes)
    for resource in ("latency", "prefill"):
        limit = getattr(problem.budget, resource)
        if limit is not None:
            add_row([(int(offsets[u]) + k, float(getattr(o, resource) or 0.0)) for u, unit in enumerate(problem.units)
                     for k, o in enumerate(unit.options)], -np.inf, limit)
    for members in problem.tie_groups().values():
        first = members[0]
        for other in members[1:]:
            for k in range(len(problem.units[first].options)):
                add_row([(int(offsets[first]) + k, 1.0), (int(offsets[other]) + k, -1.0)], 0.0, 0.0)
    matrix = coo_array((vals, (rows, cols)), shape=(len(lower), int(offsets[-1]))).tocsr()
    return LinearConstraint(matrix, np.array(lower), np.array(upper))
