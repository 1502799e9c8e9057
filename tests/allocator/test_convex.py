"""BAQ's closed form against a direct numerical optimum, cvxpy with latency, and the rounding."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from bitplan.allocator import AllocationProblem, Budget, Option, SolverStatus, Unit, solve_allocation
from bitplan.allocator.convex import LN2, block_model, convex_bits, equal_loss_bits
from tests.allocator.test_ilp import random_problem


def model_problem(seed: int, n_units: int = 6, *, latency: bool = False) -> AllocationProblem:
    """Distortion exactly c * 2^(-2b), bytes exactly a + s b: the convex model fits without error."""
    rng = np.random.default_rng(seed)
    units = []
    for u in range(n_units):
        c, numel = float(rng.lognormal(0, 1.5)), int(rng.integers(100, 1_000))
        speed = float(rng.uniform(0.5, 2.0))
        units.append(Unit(name=f"u{u}", options=tuple(
            Option(bits=b, bytes=numel * b / 8 + 4, distortion=c * 2.0 ** (-2 * b),
                   latency=(numel * b * speed / 100 + 1) if latency else None) for b in (2, 3, 4, 5, 6, 8))))
    probe = AllocationProblem(units=tuple(units), budget=Budget(bytes=1e18))
    low, high = probe.bytes_range()
    return AllocationProblem(units=tuple(units), budget=Budget(bytes=low + 0.4 * (high - low)))


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_is_the_continuous_optimum(seed: int) -> None:
    problem = model_problem(seed)
    model = block_model(problem)
    bits, lam = equal_loss_bits(model, problem.budget.bytes)

    def total(b: np.ndarray) -> float:
        return float((model.c * 2.0 ** (-2 * b)).sum())

    used = float((model.size_intercept + model.size_slope * bits).sum())
    assert used == pytest.approx(problem.budget.bytes, rel=1e-8)
    direct = minimize(total, np.full(len(bits), 4.0), method="SLSQP",
                      bounds=list(zip(model.low_bits, model.high_bits, strict=True)),
                      constraints=[{"type": "ineq", "fun": lambda b: problem.budget.bytes
                                    - float((model.size_intercept + model.size_slope * b).sum())}],
                      options={"ftol": 1e-14, "maxiter": 500})
    assert total(bits) <= direct.fun * (1 + 1e-6)
    # Equal loss: every block strictly inside its bounds has marginal loss per byte equal to the multiplier.
    inside = (bits > model.low_bits + 1e-6) & (bits < model.high_bits - 1e-6)
    marginal = 2 * LN2 * model.c * 2.0 ** (-2 * bits) / model.size_slope
    assert np.allclose(marginal[inside], lam, rtol=1e-6)


def test_cvxpy_agrees_with_the_closed_form_on_bytes_only() -> None:
    pytest.importorskip("cvxpy")
    problem = model_problem(3, n_units=8)
    model = block_model(problem)
    closed, _ = equal_loss_bits(model, problem.budget.bytes)
    assert np.allclose(convex_bits(model, problem.budget.bytes, None), closed, atol=1e-3)


@pytest.mark.parametrize("seed", range(10))
def test_rounded_allocations_fit_and_are_certified(seed: int) -> None:
    problem = random_problem(seed, n_units=4 + seed, ties=seed % 2 == 0)
    exact = solve_allocation(problem, solver="highs")
    result = solve_allocation(problem, solver="baq")
    assert result.status in (SolverStatus.OPTIMAL, SolverStatus.FEASIBLE)
    assert result.bytes <= problem.budget.bytes + 1e-6
    assert result.lower_bound <= exact.objective + 1e-9 <= result.objective + 2e-9


@pytest.mark.parametrize("seed", range(4))
def test_cvxpy_with_a_latency_budget(seed: int) -> None:
    pytest.importorskip("cvxpy")
    base = model_problem(seed, n_units=6, latency=True)
    fastest = sum(min(o.latency for o in u.options) for u in base.units)
    slowest = sum(max(o.latency for o in u.options) for u in base.units)
    problem = AllocationProblem(units=base.units, budget=Budget(bytes=base.budget.bytes,
                                                               latency=fastest + 0.3 * (slowest - fastest)))
    result = solve_allocation(problem, solver="cvxpy")
    exact = solve_allocation(problem, solver="highs")
    assert result.bytes <= problem.budget.bytes + 1e-6
    assert result.latency <= problem.budget.latency + 1e-6
    assert result.lower_bound <= exact.objective + 1e-9 <= result.objective + 2e-9
    # On instances that follow the model the rounding stays close to the optimum.
    assert result.objective <= 1.5 * exact.objective
