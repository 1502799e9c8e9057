"""The hull solver: certified bounds against the exact ILP, and frontier breakpoints that are exact."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bitplan.allocator import AllocationProblem, Budget, SolverStatus, Unit, solve_allocation
from bitplan.allocator.lagrangian import hull_upgrades_arrays, pareto_frontier, solve_lagrangian
from tests.allocator.test_ilp import random_problem


@pytest.mark.parametrize("seed", range(30))
def test_bound_brackets_the_exact_optimum(seed: int) -> None:
    problem = random_problem(seed, n_units=3 + seed % 20, ties=seed % 4 == 0)
    exact = solve_allocation(problem, solver="highs")
    fast = solve_lagrangian(problem)
    assert fast.bytes <= problem.budget.bytes + 1e-6
    assert fast.lower_bound <= exact.objective + 1e-9 <= fast.objective + 2e-9
    if seed % 4 == 0 and len(problem.units) >= 4:
        assert fast.choice[0] == fast.choice[1] and fast.choice[2] == fast.choice[3]


@pytest.mark.parametrize("seed", range(5))
def test_frontier_breakpoints_are_exact_optima(seed: int) -> None:
    base = random_problem(seed, n_units=6)
    frontier = pareto_frontier(base)
    assert all(a["bytes"] < b["bytes"] and a["objective"] > b["objective"]
               for a, b in zip(frontier, frontier[1:], strict=False))
    for point in frontier:
        problem = AllocationProblem(units=base.units, budget=Budget(bytes=point["bytes"]))
        assert solve_allocation(problem, solver="brute_force").objective == pytest.approx(point["objective"])


def test_gap_is_tiny_on_many_units() -> None:
    rng = np.random.default_rng(0)
    sizes = np.sort(rng.integers(100, 1000, size=(50_000, 4)).astype(float), axis=1)
    costs = np.sort(rng.random((50_000, 4)), axis=1)[:, ::-1].copy()
    upgrades = hull_upgrades_arrays(sizes, costs)
    assert upgrades.base_bytes == sizes[:, 0].sum()
    assert np.all(np.diff(upgrades.delta_distortion / upgrades.delta_bytes) >= 0)


def test_infeasible_and_latency() -> None:
    problem = random_problem(2, n_units=4)
    low, _ = problem.bytes_range()
    result = solve_lagrangian(AllocationProblem(units=problem.units, budget=Budget(bytes=low - 1)))
    assert result.status is SolverStatus.INFEASIBLE and result.min_feasible_bytes == pytest.approx(low)
    timed = tuple(Unit(name=u.name, options=tuple(replace(o, latency=1.0) for o in u.options))
                  for u in problem.units)
    with pytest.raises(ValueError, match="bytes budget only"):
        solve_lagrangian(AllocationProblem(units=timed, budget=Budget(bytes=1e9, latency=10)))
