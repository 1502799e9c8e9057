"""Close the hull solver's remaining gap exactly, on the few blocks whose choice the LP bound leaves open.

At the hull solution's multiplier ``lam`` the Lagrangian bound is ``L = -lam * B + sum_b min_k (c_bk + lam s_bk)``
(equal to the LP bound), and any feasible allocation ``x`` satisfies ``objective(x) >= L + sum_b r_b(x_b)`` with
the reduced costs ``r_bk = c_bk + lam s_bk - min_j (c_bj + lam s_bj) >= 0``. So an allocation better than the
incumbent can use option ``k`` of block ``b`` only if ``r_bk < incumbent - L``: every other option is eliminated.
Blocks left with one option are fixed; the few blocks with several (the "core") go to an exact integer program with
the remaining budget. When every open block fits in that program, the result is proven optimal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array


@dataclass(frozen=True)
class CoreResult:
    """Option per block after the core solve, its objective and bytes, and whether optimality is proven."""

    option: np.ndarray
    objective: float
    bytes: float
    proven_optimal: bool
    open_blocks: int  # blocks with more than one option left after the reduced-cost elimination
    solved_blocks: int  # blocks the integer program decided


def close_gap(sizes: np.ndarray, costs: np.ndarray, budget: float, incumbent: np.ndarray, multiplier: float, *,
              max_core: int = 2_000, time_limit_s: float = 10.0) -> CoreResult:
    """Improve ``incumbent`` (option per block of ``sizes``/``costs``, ``(n_blocks, n_options)`` with ``inf``
    pads for excluded options) exactly on the open blocks; at most ``max_core`` of them go to the solver."""
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
    reduced = priced - best[:, None]
    tolerance = 1e-12 * max(1.0, abs(objective))
    open_option = np.isfinite(reduced) & (reduced < slack - tolerance)
    if slack <= tolerance:
        return CoreResult(incumbent, objective, used, True, 0, 0)
    open_count = open_option.sum(axis=1)
    open_rows = np.flatnonzero(open_count >= 2)
    if open_rows.size > max_core:  # keep the blocks whose second option is cheapest to reach
        second = np.sort(np.where(open_option, reduced, np.inf), axis=1)[:, 1]
        open_rows = open_rows[np.argsort(second[open_rows], kind="stable")[:max_core]]
        proven = False
    else:
        proven = True
    # Blocks outside the core keep their one option left (full core) or the incumbent's option (partial core, whose
    # integer program then always has the incumbent as a feasible point).
    option = incumbent.copy()
    if proven:
        fixed = np.setdiff1d(rows, open_rows)
        option[fixed] = np.argmax(open_option[fixed], axis=1)
    else:
        open_option[open_rows, incumbent[open_rows]] = True
    in_core = np.zeros(len(sizes), dtype=bool)
    in_core[open_rows] = True
    fixed_bytes = float(sizes[~in_core, option[~in_core]].sum())
    block_of, option_of = np.nonzero(open_option[open_rows])
    n_vars = block_of.size
    one_each = coo_array((np.ones(n_vars), (block_of, np.arange(n_vars))), shape=(open_rows.size, n_vars))
    constraints = [LinearConstraint(one_each, 1.0, 1.0),
                   LinearConstraint(sizes[open_rows[block_of], option_of][None, :], -np.inf, budget - fixed_bytes)]
    result = milp(costs[open_rows[block_of], option_of], constraints=constraints, integrality=np.ones(n_vars),
                  bounds=Bounds(0, 1), options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9})
    # Every allocation better than the incumbent lies in the full core's program: its optimum, or the incumbent
    # when that optimum is no better (or the program is infeasible), is then the optimum.
    proven = proven and result.status in (0, 2)
    n_open = int((open_count >= 2).sum())
    if result.x is not None:
        picked = result.x > 0.5
        option[open_rows[block_of[picked]]] = option_of[picked]
        new_objective = float(costs[rows, option].sum())
        if new_objective < objective:
            return CoreResult(option, new_objective, float(sizes[rows, option].sum()), proven, n_open,
                              int(open_rows.size))
    return CoreResult(incumbent, objective, used, proven, n_open, int(open_rows.size))
