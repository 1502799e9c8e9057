"""BAQ's convex model of allocation: distortion ``c * 2^(-2b)`` and sizes linear in the bits ``b``.

Each block (a unit, or a tie group) gets a fitted model from its options: ``distortion ~ c * 2^(-2b)`` (least
squares in log space over its options with a positive distortion) and ``bytes ~ a + s * b`` (and the same for
latency). Then:

* ``baq`` solves ``min sum c 2^(-2b)`` s.t. ``sum (a + s b) <= B`` in closed form: at the optimum every block whose
  bits are not at a bound has the same marginal loss per byte, ``2 ln2 c 2^(-2b) = lam s`` (BAQ's equal-loss
  condition), so ``b(lam) = clip(log2(2 ln2 c / (lam s)) / 2)``, and ``lam`` is found by bisection;
* ``cvxpy`` solves the same model with a latency budget as well, as a convex program;

and both round the fractional bits to an integer allocation over the real options: each block starts at its
largest option at or below its fractional bits, then takes upgrades by real distortion saved per unit of
resource while they fit. The lower bound is the LP relaxation of the real problem, so the gap is certified.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from bitplan.allocator.lagrangian import block_arrays
from bitplan.allocator.problem import Allocation, AllocationProblem, SolverStatus, reject_infeasible_budget

LN2 = math.log(2.0)


@dataclass(frozen=True)
class BlockModel:
    """Per-block arrays ``(n_blocks, n_options)`` (``inf`` where bit bounds exclude an option) and fitted models."""

    blocks: list[list[int]]
    bits: np.ndarray
    sizes: np.ndarray
    costs: np.ndarray
    latencies: np.ndarray | None
    c: np.ndarray  # distortion ~ c * 2^(-2b)
    size_intercept: np.ndarray
    size_slope: np.ndarray  # bytes per bit
    latency_intercept: np.ndarray | None
    latency_slope: np.ndarray | None
    low_bits: np.ndarray
    high_bits: np.ndarray


def _fit_line(x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least-squares ``y ~ a + s x`` over the valid entries (a flat line for a single option)."""
    count = valid.sum(axis=1)
    xm = np.where(valid, x, 0).sum(axis=1) / count
    ym = np.where(valid, y, 0).sum(axis=1) / count
    dx = np.where(valid, x - xm[:, None], 0)
    dy = np.where(valid, y - ym[:, None], 0)
    var = (dx * dx).sum(axis=1)
    slope = np.where(var > 0, (dx * dy).sum(axis=1) / np.where(var > 0, var, 1), 0.0)
    return ym - slope * xm, slope


def block_model(problem: AllocationProblem) -> BlockModel:
    """Fit the convex model to every block of ``problem``."""
    blocks, sizes, costs = block_arrays(problem)
    bits = np.full(sizes.shape, np.nan)
    latencies = np.full(sizes.shape, np.inf) if problem.budget.latency is not None else None
    for row, block in enumerate(blocks):
        options = problem.units[block[0]].options
        bits[row, : len(options)] = [o.bits for o in options]
        if latencies is not None:
            latencies[row, : len(options)] = problem.block_latencies(block)
    allowed = np.isfinite(sizes)
    positive = allowed & (costs > 0)
    # log c = log d + 2 ln2 b, averaged over the options with a positive distortion (c = 0 when there are none).
    log_c = np.where(positive, np.log(np.where(positive, costs, 1.0)) + 2 * LN2 * np.nan_to_num(bits), 0.0)
    has_positive = positive.any(axis=1)
    c = np.where(has_positive, np.exp(log_c.sum(axis=1) / np.maximum(positive.sum(axis=1), 1)), 0.0)
    size_intercept, size_slope = _fit_line(np.nan_to_num(bits), np.where(allowed, sizes, 0), allowed)
    latency_intercept = latency_slope = None
    if latencies is not None:
        latency_intercept, latency_slope = _fit_line(np.nan_to_num(bits), np.where(allowed, latencies, 0), allowed)
    low_bits = np.where(allowed, bits, np.inf).min(axis=1)
    high_bits = np.where(allowed, bits, -np.inf).max(axis=1)
    return BlockModel(blocks, bits, sizes, costs, latencies, c, size_intercept, np.maximum(size_slope, 1e-12),
                      latency_intercept, latency_slope, low_bits, high_bits)


def equal_loss_bits(model: BlockModel, budget_bytes: float) -> tuple[np.ndarray, float]:
    """BAQ's closed form: fractional bits per block and the multiplier (loss per byte) meeting the budget."""

    def bits_at(lam: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            free = 0.5 * np.log2(2 * LN2 * model.c / (lam * model.size_slope))
        return np.clip(free, model.low_bits, model.high_bits)

    def used(b: np.ndarray) -> float:
        return float((model.size_intercept + model.size_slope * b).sum())

    if used(bits_at(1e-300)) <= budget_bytes:  # everything at its highest bits fits
        return bits_at(1e-300), 0.0
    low, high = -700.0, 700.0  # natural log of lam
    for _ in range(200):
        middle = 0.5 * (low + high)
        if used(bits_at(math.exp(middle))) > budget_bytes:
            low = middle
        else:
            high = middle
        if high - low < 1e-10:
            break
    lam = math.exp(high)
    return bits_at(lam), lam


def convex_bits(model: BlockModel, budget_bytes: float | None, budget_latency: float | None) -> np.ndarray:
    """The convex model with bytes and latency budgets, solved by cvxpy (Clarabel)."""
    try:
        import cvxpy as cp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("solver 'cvxpy' needs cvxpy: pip install 'bitplan[convex]'") from error
    n = len(model.blocks)
    b = cp.Variable(n)
    objective = cp.Minimize(cp.sum(cp.multiply(model.c, cp.exp(-2 * LN2 * b))))
    constraints = [b >= model.low_bits, b <= model.high_bits]
    if budget_bytes is not None:
        constraints.append(model.size_slope @ b <= budget_bytes - model.size_intercept.sum())
    if budget_latency is not None:
        assert model.latency_slope is not None and model.latency_intercept is not None
        constraints.append(model.latency_slope @ b <= budget_latency - model.latency_intercept.sum())
    cp.Problem(objective, constraints).solve()
    if b.value is None:
        raise ValueError("the convex model has no solution within the budget")
    return np.clip(np.asarray(b.value, dtype=float), model.low_bits, model.high_bits)


def round_bits(model: BlockModel, fractional: np.ndarray, budget_bytes: float | None,
               budget_latency: float | None) -> np.ndarray | None:
    """Integer option per block: round down to a real option, repair to fit, then upgrade while it fits."""
    rows = np.arange(len(model.blocks))
    allowed = np.isfinite(model.sizes)
    below = allowed & (model.bits <= fractional[:, None] + 1e-9)
    # Largest allowed option at or below the fractional bits (the smallest allowed one if none is below).
    smallest = np.argmin(np.where(allowed, model.bits, np.inf), axis=1)
    option = np.where(below.any(axis=1), np.argmax(np.where(below, model.bits, -np.inf), axis=1), smallest)
    resources = [(model.sizes, budget_bytes)]
    if budget_latency is not None:
        resources.append((model.latencies, budget_latency))

    def room(opt: np.ndarray) -> list[float]:
        return [math.inf if limit is None else limit - float(values[rows, opt].sum()) for values, limit in resources]

    if any(r < -1e-9 for r in room(option)):
        option = smallest.copy()
        if any(r < -1e-9 for r in room(option)):
            return None
    # Upgrades to any larger allowed option, best distortion saved per share of the remaining resources first.
    left = room(option)
    scale = [max(r, 1e-12) if math.isfinite(r) else 1.0 for r in left]
    while True:
        gain = model.costs[rows, option][:, None] - model.costs
        use = [values - values[rows, option][:, None] for values, _ in resources]
        fits = allowed & (gain > 0)
        for delta, r in zip(use, left, strict=True):
            fits &= delta <= r + 1e-9
        if not fits.any():
            return option
        weight = sum(np.maximum(delta, 0) / s for delta, s in zip(use, scale, strict=True))
        score = np.where(fits, gain / np.maximum(weight, 1e-300), -np.inf)
        # Take the best upgrade of each block, best blocks first, in one pass; then look again.
        best_option = np.argmax(score, axis=1)
        best_score = score[rows, best_option]
        order = np.argsort(-best_score)
        changed = False
        for row in order[np.isfinite(best_score[order])]:
            k = best_option[row]
            deltas = [float(delta[row, k]) for delta in use]
            if all(d <= r + 1e-9 for d, r in zip(deltas, left, strict=True)):
                option[row] = k
                left = [r - d for r, d in zip(left, deltas, strict=True)]
                changed = True
        if not changed:
            return option


def lp_lower_bound(model: BlockModel, budget_bytes: float | None, budget_latency: float | None) -> float | None:
    """The LP relaxation of the real (integer) problem over the blocks: a certified lower bound."""
    allowed = np.isfinite(model.sizes)
    block_of, option_of = np.nonzero(allowed)
    n_vars = block_of.size
    one_each = coo_array((np.ones(n_vars), (block_of, np.arange(n_vars))), shape=(len(model.blocks), n_vars))
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    if budget_bytes is not None:
        constraints.append(LinearConstraint(model.sizes[block_of, option_of][None, :], -np.inf, budget_bytes))
    if budget_latency is not None:
        constraints.append(LinearConstraint(model.latencies[block_of, option_of][None, :], -np.inf, budget_latency))
    result = milp(model.costs[block_of, option_of], constraints=constraints, integrality=np.zeros(n_vars),
                  bounds=Bounds(0, 1))
    return None if result.x is None else float(result.fun)


def solve_convex(problem: AllocationProblem, *, method: str = "baq") -> Allocation:
    """``method="baq"``: closed-form equal-loss bits (bytes budget only); ``"cvxpy"``: the convex program with
    bytes and latency budgets. Both rounded to an integer allocation with a certified LP lower bound."""
    started = time.perf_counter()
    early = reject_infeasible_budget(problem, method, started)
    if early is not None:
        return early
    if problem.budget.prefill is not None:
        raise ValueError(f"the {method} solver takes no prefill budget; use solver 'highs'")
    model = block_model(problem)
    budget = problem.budget
    if method == "baq":
        if budget.latency is not None or budget.bytes is None:
            raise ValueError("the baq closed form handles a bytes budget only; use solver 'cvxpy' for latency")
        fractional, lam = equal_loss_bits(model, budget.bytes)
    elif method == "cvxpy":
        fractional, lam = convex_bits(model, budget.bytes, budget.latency), math.nan
    else:
        raise ValueError(f"unknown convex method {method!r}")
    option = round_bits(model, fractional, budget.bytes, budget.latency)
    if option is None:
        return Allocation.without_solution(problem, status=SolverStatus.INFEASIBLE, solver=method,
                                           solve_s=time.perf_counter() - started,
                                           message="no allocation meets both the bytes and the latency budget")
    choice = np.zeros(len(problem.units), dtype=int)
    for row, members in enumerate(model.blocks):
        choice[members] = option[row]
    objective, used, latency = problem.evaluate(tuple(int(k) for k in choice))
    bound = lp_lower_bound(model, budget.bytes, budget.latency)
    lower_bound = objective if bound is None else min(bound, objective)
    status = SolverStatus.OPTIMAL if objective - lower_bound <= 1e-9 * max(1.0, abs(objective)) else \
        SolverStatus.FEASIBLE
    extra = {"mean_fractional_bits": float(fractional.mean())}
    if math.isfinite(lam):
        extra["multiplier"] = lam
    return Allocation(status=status, choice=tuple(int(k) for k in choice), objective=objective,
                      lower_bound=lower_bound, bytes=used, latency=latency, solve_s=time.perf_counter() - started,
                      solver=method, message="convex model c*2^(-2b), rounded; LP lower bound", extra=extra)
