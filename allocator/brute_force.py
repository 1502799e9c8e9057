"""Exhaustive search: the slow, obviously correct reference for small problems (tests only)."""

from __future__ import annotations

import itertools
import time

from bitplan.allocator.problem import Allocation, AllocationProblem, SolverStatus


def solve_brute_force(problem: AllocationProblem, *, max_combinations: int = 2_000_000) -> Allocation:
    """Try every combination of options (ties respected) and keep the best feasible one."""
    started = time.perf_counter()
    blocks = problem.blocks()
    allowed = [[k for k, ok in enumerate(problem.block_allowed(block)) if ok] for block in blocks]
    total = 1
    for indices in allowed:
        total *= len(indices)
    if total > max_combinations:
        raise ValueError(f"{total} combinations exceed max_combinations={max_combinations}; use solve_ilp")
    best: tuple[float, tuple[int, ...], float, float | None] | None = None
    for picks in itertools.product(*allowed):
        choice = [0] * len(problem.units)
        for block, k in zip(blocks, picks, strict=True):
            for u in block:
                choice[u] = k
        objective, used, latency = problem.evaluate(choice)
        if problem.budget.bytes is not None and used > problem.budget.bytes + 1e-9:
            continue
        if problem.budget.latency is not None and latency is not None and latency > problem.budget.latency + 1e-9:
            continue
        prefill = problem.prefill_of(choice)
        if problem.budget.prefill is not None and prefill is not None and prefill > problem.budget.prefill + 1e-9:
            continue
        if best is None or objective < best[0]:
            best = (objective, tuple(choice), used, latency)
    elapsed = time.perf_counter() - started
    if best is None:
        return Allocation.without_solution(problem, status=SolverStatus.INFEASIBLE, solver="brute_force",
                                           solve_s=elapsed, message="no combination fits the budget")
    objective, choice, used, latency = best
    return Allocation(status=SolverStatus.OPTIMAL, choice=choice, objective=objective, lower_bound=objective,
                      bytes=used, latency=latency, solve_s=elapsed, solver="brute_force")
