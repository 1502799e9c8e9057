"""The exact solvers against brute force, on seeded random instances (scipy's test_milp style)."""

from __future__ import annotations

import json
import random

import pytest

from bitplan.allocator import AllocationProblem, Budget, Option, SolverStatus, Unit, problem_from_json, solve_allocation
from bitplan.allocator.brute_force import solve_brute_force


def random_problem(seed: int, n_units: int, n_options: int = 4, *, ties: bool = False,
                   budget_fraction: float | None = None) -> AllocationProblem:
    rng = random.Random(seed)
    units = []
    for u in range(n_units):
        options = []
        for k in range(n_options):
            bits = 2 + k
            size = rng.randint(50, 150) * bits
            options.append(Option(bits=bits, bytes=float(size), distortion=rng.uniform(0.1, 10.0) / bits ** 2))
        tie = f"t{u // 2}" if ties and u < 4 else None
        units.append(Unit(name=f"u{u}", options=tuple(options), tie=tie))
    probe = AllocationProblem(units=tuple(units), budget=Budget(bytes=1e18))
    low, high = probe.bytes_range()
    fraction = rng.uniform(0.0, 1.0) if budget_fraction is None else budget_fraction
    return AllocationProblem(units=tuple(units), budget=Budget(bytes=low + fraction * (high - low)))


@pytest.mark.parametrize("seed", range(30))
def test_highs_equals_brute_force(seed: int) -> None:
    problem = random_problem(seed, n_units=1 + seed % 8, ties=seed % 3 == 0)
    exact = solve_allocation(problem, solver="highs")
    brute = solve_brute_force(problem)
    assert exact.status is SolverStatus.OPTIMAL
    assert exact.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-9)
    assert exact.bytes <= problem.budget.bytes + 1e-6
    assert exact.lower_bound <= exact.objective + 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_highs_is_exact_when_every_predicted_loss_is_tiny(seed: int) -> None:
    """Predicted losses of 1e-9 per unit (a small model's): HiGHS's absolute gap must not end the search early."""
    base = random_problem(seed, n_units=8)
    units = tuple(Unit(name=u.name, options=tuple(Option(bits=o.bits, bytes=o.bytes, distortion=o.distortion * 1e-9)
                                                   for o in u.options)) for u in base.units)
    problem = AllocationProblem(units=units, budget=base.budget)
    exact = solve_allocation(problem, solver="highs")
    brute = solve_brute_force(problem)
    assert exact.objective == pytest.approx(brute.objective, rel=1e-9, abs=0.0)
    assert exact.lower_bound <= exact.objective * (1 + 1e-9)
    assert exact.lower_bound >= exact.objective * (1 - 1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_pulp_agrees_with_highs(seed: int) -> None:
    pytest.importorskip("pulp")
    problem = random_problem(seed, n_units=12)
    assert solve_allocation(problem, solver="pulp").objective == pytest.approx(
        solve_allocation(problem, solver="highs").objective, rel=1e-7)


@pytest.mark.parametrize("seed", range(10))
def test_ties_respected(seed: int) -> None:
    problem = random_problem(seed, n_units=6, ties=True)
    result = solve_allocation(problem)
    assert result.choice[0] == result.choice[1]
    assert result.choice[2] == result.choice[3]


@pytest.mark.parametrize("seed", range(5))
def test_more_budget_never_worse(seed: int) -> None:
    base = random_problem(seed, n_units=20, budget_fraction=0.0)
    low, high = base.bytes_range()
    previous = float("inf")
    for step in range(11):
        budget = low + (high - low) * step / 10
        result = solve_allocation(AllocationProblem(units=base.units, budget=Budget(bytes=budget)))
        assert result.bytes <= budget + 1e-6
        assert result.objective <= previous + 1e-9
        previous = result.objective


def test_infeasible_budget_reports_minimum() -> None:
    problem = random_problem(1, n_units=5)
    low, _ = problem.bytes_range()
    tight = AllocationProblem(units=problem.units, budget=Budget(bytes=low - 1))
    for solver in ("highs", "brute_force"):
        result = solve_allocation(tight, solver=solver)
        assert result.status is SolverStatus.INFEASIBLE
        assert result.min_feasible_bytes == pytest.approx(low)
        assert result.choice == ()


def test_latency_budget() -> None:
    units = tuple(Unit(name=f"u{i}", options=(Option(bits=2, bytes=1, distortion=4, latency=1),
                                              Option(bits=4, bytes=2, distortion=1, latency=3)))
                  for i in range(4))
    result = solve_allocation(AllocationProblem(units=units, budget=Budget(bytes=100, latency=8)))
    assert result.latency <= 8
    assert result.objective == pytest.approx(10.0)  # two units at 4 bits, two at 2 bits


def test_problem_from_json_round_trip() -> None:
    data = {"units": [{"name": "a", "options": [{"bits": 2, "bytes": 10, "distortion": 3.0},
                                                {"bits": 4, "bytes": 20, "distortion": 1.0}]}],
            "budget": {"bytes": 15}}
    problem = problem_from_json(json.loads(json.dumps(data)))
    assert solve_allocation(problem).choice == (0,)


@pytest.mark.parametrize("data, message", [
    ([], "must be a JSON object"),
    ({"units": [], "budget": {"bytes": 1}}, "no units"),
    ({"units": [{"name": "a", "options": [{"bits": 2}]}], "budget": {"bytes": 1}}, "needs 'bits', 'bytes'"),
    ({"units": [{"name": "a", "options": [{"bits": 2, "bytes": 1, "distortion": 1}]}], "budget": {}},
     "needs 'bytes', 'latency' or 'prefill'"),
    ({"units": [{"name": "a", "options": [{"bits": 2, "bytes": -1, "distortion": 1}]}], "budget": {"bytes": 1}},
     "bytes must be a finite number"),
])
def test_bad_problem_is_rejected(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        problem_from_json(data)


def test_time_limit_returns_best_found_with_its_bound() -> None:
    problem = random_problem(3, n_units=3_000, n_options=6, budget_fraction=0.37)
    result = solve_allocation(problem, solver="highs", time_limit_s=0.05)
    assert result.status in (SolverStatus.OPTIMAL, SolverStatus.FEASIBLE, SolverStatus.TIME_LIMIT)
    if result.status is not SolverStatus.TIME_LIMIT:
        assert result.bytes <= problem.budget.bytes + 1e-6
        assert result.lower_bound <= result.objective
    else:
        assert result.choice == () and result.min_feasible_bytes is not None


def test_every_bytes_answer_names_its_multiplier() -> None:
    problem = random_problem(4, n_units=30, budget_fraction=0.5)
    prices = {solver: solve_allocation(problem, solver=solver).extra["multiplier"]
              for solver in ("highs", "lagrangian", "baq")}
    assert prices["highs"] > 0 and prices["highs"] == pytest.approx(prices["lagrangian"])
