"""Close the hull solver's remaining gap exactly, on the few blocks whose choice the LP bound leaves open.

At the hull solution's multiplier ``lam`` the Lagrangian bound is ``L = -lam * B + sum_b min_k (c_bk + lam s_bk)``
(equal to the LP bound), and any feasible allocation ``x`` satisfies ``objective(x) >= L + sum_b r_b(x_b)`` with
the reduced costs ``r_bk = c_bk + lam s_bk - min_j (c_bj + lam s_bj) >= 0``. So an allocation better than the
incumbent can use option ``k`` of block ``b`` only if ``r_bk < incumbent - L``: every other option is eliminated.
Blocks left with one option are fixed; the few blocks with several (the "core") go to an exact dynamic program over
(bytes, distortion) Pareto points with the remaining budget, which also drops partial allocations whose reduced
cost already reaches that slack. When the program completes, the result is proven optimal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from bitplan.allocator.ilp import objective_scale, stdout_to_stderr


@dataclass(frozen=True)
class CoreResult:
    """Option per block after the core solve, its objective and bytes, and whether optimality is proven."""

    option: np.ndarray
    objective: float
    bytes: float
    proven_optimal: bool
    open_blocks: int  # blocks with more than one option left after the reduced-cost elimination
    solved_blocks: int  # blocks the dynamic program decided


def close_gap(sizes: np.ndarray, costs: np.ndarray, budget: float, incumbent: np.ndarray, multiplier: float, *,
              max_points: int = 20_000, prove_up_to: int = 1_000, max_core: int = 200,
              time_limit_s: float = 2.0) -> CoreResult:
    """Improve ``incumbent`` (option per block of ``sizes``/``costs``, ``(n_blocks, n_options)`` with ``inf``
    pads for excluded options) exactly on the open blocks.

    First a dynamic program over the open blocks keeps the Pareto-optimal (bytes, distortion) partial allocations
    whose reduced cost is still below the slack: exact and proven when it stays under ``max_points``. Past that,
    HiGHS solves the open blocks within ``time_limit_s`` (all of them when at most ``prove_up_to``, else the
    ``max_core`` nearest the multiplier) with the rest kept at the incumbent's options: never worse than the
    incumbent, proven only when every open block was in it and HiGHS finished."""
    rows = np.arange(len(sizes))
    objective = float(costs[rows, incumbent].sum())
    used = float(sizes[rows, incumbent].sum())
    with np.errstate(invalid="ignore"):
        priced = costs + multiplier * sizes
    best = priced.min(axis=1)
    bound = -multiplier * budget + float(best.sum())
    slack = objective - bound
    if not np.isfinite(slack):
        return CoreResult(incumbent, objective, used, False, len(sizes), 0)
    tolerance = 1e-12 * max(1.0, abs(objective))
    if slack <= tolerance:
        return CoreResult(incumbent, objective, used, True, 0, 0)
    reduced = priced - best[:, None]
    open_option = np.isfinite(reduced) & (reduced < slack - tolerance)
    open_rows = np.flatnonzero(open_option.sum(axis=1) >= 2)
    option = np.argmax(open_option, axis=1)  # the one option left on every other block
    fixed = np.ones(len(sizes), dtype=bool)
    fixed[open_rows] = False
    capacity = budget - float(sizes[fixed, option[fixed]].sum())
    picked = _pareto_program(sizes[open_rows], costs[open_rows], reduced[open_rows], open_option[open_rows],
                             capacity, slack - tolerance, max_points, multiplier)
    if picked is None:
        core_size = open_rows.size if open_rows.size <= prove_up_to else max_core
        return _highs_core(sizes, costs, budget, incumbent, reduced, open_option, open_rows, core_size, time_limit_s)
    if picked is _NONE_BETTER:
        return CoreResult(incumbent, objective, used, True, int(open_rows.size), int(open_rows.size))
    option[open_rows] = picked
    new_objective = float(costs[rows, option].sum())
    if new_objective >= objective:
        return CoreResult(incumbent, objective, used, True, int(open_rows.size), int(open_rows.size))
    return CoreResult(option, new_objective, float(sizes[rows, option].sum()), True, int(open_rows.size),
                      int(open_rows.size))


_NONE_BETTER = np.zeros(0, dtype=int)


def _highs_core(sizes: np.ndarray, costs: np.ndarray, budget: float, incumbent: np.ndarray, reduced: np.ndarray,
                open_option: np.ndarray, open_rows: np.ndarray, max_core: int, time_limit_s: float) -> CoreResult:
    """The open blocks (at most ``max_core``, those whose second option is cheapest to reach) as an integer
    program for HiGHS; the other blocks keep the incumbent's options, so the incumbent stays feasible."""
    rows = np.arange(len(sizes))
    objective = float(costs[rows, incumbent].sum())
    n_open = int(open_rows.size)
    complete = n_open <= max_core
    if not complete:
        second = np.sort(np.where(open_option[open_rows], reduced[open_rows], np.inf), axis=1)[:, 1]
        open_rows = open_rows[np.argsort(second, kind="stable")[:max_core]]
    allowed = open_option[open_rows].copy()
    allowed[np.arange(open_rows.size), incumbent[open_rows]] = True
    in_core = np.zeros(len(sizes), dtype=bool)
    in_core[open_rows] = True
    capacity = budget - float(sizes[~in_core, incumbent[~in_core]].sum())
    block_of, option_of = np.nonzero(allowed)
    n_vars = block_of.size
    one_each = coo_array((np.ones(n_vars), (block_of, np.arange(n_vars))), shape=(open_rows.size, n_vars))
    constraints = [LinearConstraint(one_each, 1.0, 1.0),
                   LinearConstraint(sizes[open_rows[block_of], option_of][None, :], -np.inf, capacity)]
    program_costs = costs[open_rows[block_of], option_of]
    program_costs = program_costs / objective_scale(program_costs, int(open_rows.size))  # HiGHS's absolute gaps
    with stdout_to_stderr():
        result = milp(program_costs, constraints=constraints, integrality=np.ones(n_vars),
                      bounds=Bounds(0, 1), options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9})
    option = incumbent.copy()
    if result.x is not None:
        picked = result.x > 0.5
        option[open_rows[block_of[picked]]] = option_of[picked]
    # With every open block in the program, its optimum (or the incumbent, when no better) is the optimum.
    proven = complete and result.status == 0
    new_objective = float(costs[rows, option].sum())
    if new_objective >= objective:
        option, new_objective = incumbent, objective
    return CoreResult(option, new_objective, float(sizes[rows, option].sum()), proven, n_open, int(open_rows.size))


def _pareto_program(sizes: np.ndarray, costs: np.ndarray, reduced: np.ndarray, allowed: np.ndarray,
                    capacity: float, limit: float, max_points: int, multiplier: float) -> np.ndarray | None:
    """Option per block of least distortion within ``capacity`` bytes, by a dynamic program over the blocks that
    keeps the (bytes, distortion) Pareto-optimal partial allocations, dropping those whose reduced cost reaches
    ``limit`` (they cannot beat the incumbent). ``_NONE_BETTER`` when none is left, ``None`` past ``max_points``."""
    front_sizes, front_costs, front_reduced = np.zeros(1), np.zeros(1), np.zeros(1)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    # Bytes the blocks after each row can add at most: capacity a partial allocation leaves unused even then
    # costs ``multiplier`` per byte in the bound.
    largest = np.where(allowed, sizes, -np.inf).max(axis=1)
    still_to_add = np.concatenate([np.cumsum(largest[::-1])[::-1][1:], [0.0]])
    for row in range(len(sizes)):
        options = np.flatnonzero(allowed[row])
        merged_sizes = (front_sizes[:, None] + sizes[row, options][None, :]).ravel()
        merged_costs = (front_costs[:, None] + costs[row, options][None, :]).ravel()
        merged_reduced = (front_reduced[:, None] + reduced[row, options][None, :]).ravel()
        unused = np.maximum(0.0, capacity - merged_sizes - still_to_add[row])
        index = np.flatnonzero((merged_sizes <= capacity + 1e-9) & (merged_reduced + multiplier * unused < limit))
        order = index[np.lexsort((merged_costs[index], merged_sizes[index]))]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], merged_costs[order][:-1]]))
        order = order[merged_costs[order] < best_before]
        if order.size == 0:
            return _NONE_BETTER
        if order.size > max_points:
            return None
        front_sizes, front_costs, front_reduced = merged_sizes[order], merged_costs[order], merged_reduced[order]
        history.append((order // len(options), options[order % len(options)]))
    point = int(np.argmin(front_costs))
    picked = np.zeros(len(sizes), dtype=int)
    for row in range(len(sizes) - 1, -1, -1):
        parents, choices = history[row]
        picked[row] = choices[point]
        point = int(parents[point])
    return picked
