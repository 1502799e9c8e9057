"""Bit bounds and pins in every solver, and the hull solver's exact gap closing, against brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bitplan.allocator import AllocationProblem, Budget, Option, SolverStatus, Unit, problem_from_json, solve_allocation
from bitplan.allocator.brute_force import solve_brute_force
from bitplan.allocator.core import close_gap
from bitplan.allocator.lagrangian import hull_upgrades_arrays, solve_hull, solve_lagrangian
from tests.allocator.test_ilp import random_problem


def bounded(problem: AllocationProblem, seed: int) -> AllocationProblem:
    """Random min/max bits and pins on some units; the budget moved inside the new achievable range."""
    rng = random.Random(seed)
    units = []
    for unit in problem.units:
        kind = rng.choice(["free", "free", "min", "max", "pin"])
        bits = sorted(o.bits for o in unit.options)
        pick = rng.choice(bits)
        min_bits = pick if kind in ("min", "pin") else None
        max_bits = pick if kind in ("max", "pin") else None
        units.append(Unit(name=unit.name, options=unit.options, min_bits=min_bits, max_bits=max_bits))
    probe = AllocationProblem(units=tuple(units), budget=Budget(bytes=1e18))
    low, high = probe.bytes_range()
    return AllocationProblem(units=tuple(units), budget=Budget(bytes=low + rng.uniform(0, 1) * (high - low)))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("solver", ["highs", "lagrangian", "pulp"])
def test_bounds_respected_and_optimal(seed: int, solver: str) -> None:
    if solver == "pulp":
        pytest.importorskip("pulp")
    problem = bounded(random_problem(seed, n_units=1 + seed % 8), seed)
    result = solve_allocation(problem, solver=solver)
    brute = solve_brute_force(problem)
    assert result.status is SolverStatus.OPTIMAL
    assert result.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-9)
    for unit, k in zip(problem.units, result.choice, strict=True):
        bits = unit.options[k].bits
        assert unit.min_bits is None or bits >= unit.min_bits
        assert unit.max_bits is None or bits <= unit.max_bits


def test_pins_below_budget_report_the_smallest_feasible_size() -> None:
    units = tuple(Unit(name=f"u{i}", options=(Option(bits=2, bytes=2, distortion=4), Option(bits=4, bytes=4,
                  distortion=1)), min_bits=4 if i == 0 else None) for i in range(3))
    problem = AllocationProblem(units=units, budget=Budget(bytes=7))
    for solver in ("highs", "lagrangian", "brute_force", "baq"):
        result = solve_allocation(problem, solver=solver)
        assert result.status is SolverStatus.INFEASIBLE, solver
        assert result.min_feasible_bytes == 8.0


def test_pin_in_json_and_conflicting_tie_bounds() -> None:
    options = [{"bits": 2, "bytes": 2, "distortion": 4}, {"bits": 4, "bytes": 4, "distortion": 1}]
    problem = problem_from_json({"units": [{"name": "a", "options": options, "pin": 4},
                                           {"name": "b", "options": options}], "budget": {"bytes": 6}})
    assert solve_allocation(problem).choice == (1, 0)
    with pytest.raises(ValueError, match="no option allowed for all"):
        problem_from_json({"units": [{"name": "a", "options": options, "pin": 4, "tie": "t"},
                                     {"name": "b", "options": options, "pin": 2, "tie": "t"}], "budget": {"bytes": 9}})
    with pytest.raises(ValueError, match="no option has bits"):
        problem_from_json({"units": [{"name": "a", "options": options, "min_bits": 5}], "budget": {"bytes": 9}})
    with pytest.raises(ValueError, match="integer number of bits"):
        problem_from_json({"units": [{"name": "a", "options": options, "pin": "x"}], "budget": {"bytes": 9}})


def test_infeasible_latency_names_the_smallest_latency() -> None:
    units = tuple(Unit(name=f"u{i}", options=(Option(bits=2, bytes=1, distortion=4, latency=2),
                                              Option(bits=4, bytes=2, distortion=1, latency=3))) for i in range(3))
    result = solve_allocation(AllocationProblem(units=units, budget=Budget(bytes=100, latency=5)))
    assert result.status is SolverStatus.INFEASIBLE
    assert result.to_json()["min_feasible_latency"] == 6.0


@pytest.mark.parametrize("seed", range(40))
def test_gap_closing_proves_the_exact_optimum(seed: int) -> None:
    problem = random_problem(seed, n_units=2 + seed % 7, ties=seed % 3 == 0)
    closed = solve_lagrangian(problem)
    brute = solve_brute_force(problem)
    assert closed.status is SolverStatus.OPTIMAL
    assert closed.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-12)
    assert closed.bytes <= problem.budget.bytes + 1e-6
    hull_only = solve_lagrangian(problem, close_gap=False)
    assert hull_only.lower_bound <= closed.objective + 1e-9 <= hull_only.objective + 2e-9


@pytest.mark.parametrize("seed", range(3))
def test_gap_closing_matches_highs_at_scale(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, bits = 3_000, np.arange(2, 6)
    numel = rng.integers(100, 2_000, size=(n, 1))
    sizes = (numel * bits / 8 + 4).astype(float)
    costs = rng.lognormal(0, 2, size=(n, 1)) * numel * 4.0 ** -bits * rng.uniform(0.7, 1.3, size=(n, 4))
    budget = float(sizes[:, 0].sum() + 0.4 * (sizes[:, -1].sum() - sizes[:, 0].sum()))
    hull = solve_hull(hull_upgrades_arrays(sizes, costs), budget)
    core = close_gap(sizes, costs, budget, hull.option, hull.multiplier)
    units = tuple(Unit(name=str(i), options=tuple(Option(bits=int(b), bytes=float(s), distortion=float(c))
                                                  for b, s, c in zip(bits, sizes[i], costs[i], strict=True)))
                  for i in range(n))
    exact = solve_allocation(AllocationProblem(units=units, budget=Budget(bytes=budget)), solver="highs")
    assert core.proven_optimal
    assert core.bytes <= budget + 1e-6
    assert core.objective <= hull.objective + 1e-9
    assert core.objective == pytest.approx(exact.objective, rel=1e-7)


def test_core_fallbacks_agree_or_stay_unproven() -> None:
    rng = np.random.default_rng(7)
    sizes = np.tile(np.array([2.0, 3.0, 4.0]), (200, 1)) * rng.integers(1, 5, size=(200, 1))
    costs = rng.uniform(0.5, 1.5, size=(200, 1)) * 4.0 ** -np.arange(3) * rng.uniform(0.8, 1.2, size=(200, 3))
    budget = float(sizes[:, 1].sum()) + 0.5
    hull = solve_hull(hull_upgrades_arrays(sizes, costs), budget)
    program = close_gap(sizes, costs, budget, hull.option, hull.multiplier)
    highs = close_gap(sizes, costs, budget, hull.option, hull.multiplier, max_points=1)  # HiGHS on every open block
    partial = close_gap(sizes, costs, budget, hull.option, hull.multiplier, max_points=1, prove_up_to=0, max_core=1)
    assert program.proven_optimal and highs.proven_optimal
    assert program.objective == pytest.approx(highs.objective, rel=1e-9)
    assert program.objective <= hull.objective + 1e-12 and program.bytes <= budget + 1e-9
    assert partial.objective <= hull.objective + 1e-12 and partial.bytes <= budget + 1e-9
    if program.open_blocks > 1:
        assert not partial.proven_optimal


def test_gap_closing_is_exact_when_every_predicted_loss_is_tiny() -> None:
    """The same problem with every cost x1e-9 (a small model's predicted losses): HiGHS's absolute gap must not
    make the core program stop early and still call its answer proven."""
    rng = np.random.default_rng(3)
    n, bits = 300, np.arange(2, 6)
    numel = rng.integers(100, 2_000, size=(n, 1))
    sizes = (numel * bits / 8 + 4).astype(float)
    costs = rng.lognormal(0, 2, size=(n, 1)) * numel * 4.0 ** -bits * rng.uniform(0.7, 1.3, size=(n, 4))
    budget = float(sizes[:, 0].sum() + 0.4 * (sizes[:, -1].sum() - sizes[:, 0].sum()))
    answers = []
    for factor in (1.0, 1e-9):
        scaled = costs * factor
        hull = solve_hull(hull_upgrades_arrays(sizes, scaled), budget)
        core = close_gap(sizes, scaled, budget, hull.option, hull.multiplier)
        assert core.proven_optimal
        answers.append(core.objective / factor)
    assert answers[1] == pytest.approx(answers[0], rel=1e-9)
