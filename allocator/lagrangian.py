"""Lagrangian / convex-hull solver for the bytes-only knapsack, vectorized over units.

Each block (a unit, or a tie group whose members choose together) keeps only the options on the lower convex
hull of (bytes, distortion). Moving along a hull from its smallest option is a sequence of upgrades with
decreasing efficiency ``-d distortion / d bytes``, so sorting every upgrade of every block by efficiency and
taking them greedily traces the LP relaxation exactly:

* the integer answer takes the longest prefix of upgrades that fits, then any later upgrades that still fit;
* the LP lower bound adds the fitting fraction of the first upgrade that did not fit, so the gap is certified;
* the multiplier is that upgrade's efficiency (marginal distortion per byte at the budget);
* every prefix is an integer allocation that is optimal at its own byte count: the Pareto frontier's
  breakpoints, all from one sort.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bitplan.allocator.core import close_gap as close_gap_exactly
from bitplan.allocator.problem import Allocation, AllocationProblem, SolverStatus


@dataclass(frozen=True)
class HullUpgrades:
    """Upgrades of all blocks, sorted by efficiency (best first), and each block's starting option."""

    blocks: list[list[int]] | None  # units of each block; None: block i is unit i
    start_option: np.ndarray  # (n_blocks,) option index on which each block starts
    base_bytes: float
    base_distortion: float
    block: np.ndarray  # (n_upgrades,) block of each upgrade
    to_option: np.ndarray  # (n_upgrades,) option the block moves to
    delta_bytes: np.ndarray
    delta_distortion: np.ndarray  # negative: an upgrade lowers distortion


def block_arrays(problem: AllocationProblem) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Per-block option bytes and distortions ``(n_blocks, max_options)``, padded with +inf."""
    blocks = problem.blocks()
    width = max(len(problem.units[b[0]].options) for b in blocks)
    sizes = np.full((len(blocks), width), np.inf)
    costs = np.full((len(blocks), width), np.inf)
    for row, block in enumerate(blocks):
        block_sizes, block_costs = problem.block_totals(block)
        sizes[row, : len(block_sizes)] = block_sizes
        costs[row, : len(block_costs)] = block_costs
    return blocks, sizes, costs


def hull_upgrades(problem: AllocationProblem) -> HullUpgrades:
    """Walk every block's lower convex hull at once (``max_options`` vectorized steps)."""
    blocks, sizes, costs = block_arrays(problem)
    return hull_upgrades_arrays(sizes, costs, blocks=blocks)


def hull_upgrades_arrays(sizes: np.ndarray, costs: np.ndarray, *, blocks: list[list[int]] | None = None
                         ) -> HullUpgrades:
    """Hull upgrades from ``sizes`` and ``costs`` ``(n_blocks, n_options)`` float arrays (+inf pads)."""
    n_blocks, width = sizes.shape
    rows = np.arange(n_blocks)
    # Start at the smallest option (lowest distortion among equally small ones).
    start = np.lexsort((costs, sizes), axis=1)[:, 0] if width > 1 else np.zeros(n_blocks, dtype=int)
    current = start.copy()
    steps_block, steps_to, steps_bytes, steps_cost = [], [], [], []
    for _ in range(width - 1):
        cur_size = sizes[rows, current][:, None]
        cur_cost = costs[rows, current][:, None]
        d_size = sizes - cur_size
        d_cost = costs - cur_cost
        valid = (d_size > 0) & (d_cost < 0) & np.isfinite(sizes)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(valid, d_cost / np.where(valid, d_size, 1.0), np.inf)
        # Most negative slope; among equal slopes the farthest point (fewer, larger steps).
        best_slope = slope.min(axis=1)
        candidates = np.where(slope <= best_slope[:, None] * (1 - 1e-12), d_size, -np.inf)
        nxt = candidates.argmax(axis=1)
        moving = np.isfinite(best_slope)
        if not moving.any():
            break
        idx = rows[moving]
        steps_block.append(idx)
        steps_to.append(nxt[moving])
        steps_bytes.append(d_size[idx, nxt[moving]])
        steps_cost.append(d_cost[idx, nxt[moving]])
        current = np.where(moving, nxt, current)
    block = np.concatenate(steps_block) if steps_block else np.zeros(0, dtype=int)
    to_option = np.concatenate(steps_to) if steps_to else np.zeros(0, dtype=int)
    delta_bytes = np.concatenate(steps_bytes) if steps_bytes else np.zeros(0)
    delta_cost = np.concatenate(steps_cost) if steps_cost else np.zeros(0)
    # Slopes strictly increase along each hull (equal slopes were merged into one step by the farthest-point
    # rule), so any sort by slope keeps every block's upgrades in hull order.
    order = np.argsort(delta_cost / delta_bytes)
    return HullUpgrades(blocks=blocks, start_option=start, base_bytes=float(sizes[rows, start].sum()),
                        base_distortion=float(costs[rows, start].sum()), block=block[order],
                        to_option=to_option[order], delta_bytes=delta_bytes[order],
                        delta_distortion=delta_cost[order])


@dataclass(frozen=True)
class HullSolution:
    """Option per block, with the integer objective, the LP lower bound, bytes used and the multiplier."""

    option: np.ndarray
    objective: float
    lower_bound: float
    bytes: float
    multiplier: float


def solve_hull(upgrades: HullUpgrades, budget: float) -> HullSolution | None:
    """Greedy over sorted upgrades; ``None`` when even the smallest options exceed ``budget``."""
    if upgrades.base_bytes > budget + 1e-9:
        return None
    room = budget - upgrades.base_bytes
    cumulative = np.cumsum(upgrades.delta_bytes)
    prefix = int(np.searchsorted(cumulative, room + 1e-9, side="right"))
    lower_bound = upgrades.base_distortion + float(upgrades.delta_distortion[:prefix].sum())
    multiplier = 0.0
    taken = np.zeros(len(upgrades.block), dtype=bool)
    taken[:prefix] = True
    if prefix < len(upgrades.block):
        left = room - (float(cumulative[prefix - 1]) if prefix else 0.0)
        lower_bound += left / float(upgrades.delta_bytes[prefix]) * float(upgrades.delta_distortion[prefix])
        multiplier = -float(upgrades.delta_distortion[prefix] / upgrades.delta_bytes[prefix])
        _fill_remaining(upgrades, taken, prefix, left)
    option = upgrades.start_option.copy()
    # Upgrades of a block are taken in hull order, so the last one taken is the block's final option.
    index = np.flatnonzero(taken)
    option[upgrades.block[index]] = upgrades.to_option[index]
    objective = upgrades.base_distortion + float(upgrades.delta_distortion[index].sum())
    used = upgrades.base_bytes + float(upgrades.delta_bytes[index].sum())
    return HullSolution(option=option, objective=objective, lower_bound=min(lower_bound, objective), bytes=used,
                        multiplier=multiplier)


def solve_lagrangian(problem: AllocationProblem, *, close_gap: bool = True) -> Allocation:
    """Integer allocation with a certified LP lower bound, for a bytes budget (latency unsupported here).
    With ``close_gap`` the blocks that the LP bound leaves open are re-solved exactly (``allocator.core``), which
    proves optimality unless that program grows past its point limit."""
    started = time.perf_counter()
    if problem.has_time_budget or problem.budget.bytes is None:
        raise ValueError("the lagrangian solver handles a bytes budget only; use solver 'highs' for latency")
    blocks, sizes, costs = block_arrays(problem)
    upgrades = hull_upgrades_arrays(sizes, costs, blocks=blocks)
    solution = solve_hull(upgrades, problem.budget.bytes)
    if solution is None:
        return Allocation.without_solution(
            problem, status=SolverStatus.INFEASIBLE, solver="lagrangian", solve_s=time.perf_counter() - started,
            message=f"budget of {problem.budget.bytes:g} bytes is below the smallest achievable size "
                    f"{upgrades.base_bytes:g} bytes")
    option, proven, extra = solution.option, False, {"multiplier": solution.multiplier}
    if close_gap:
        core = close_gap_exactly(sizes, costs, problem.budget.bytes, solution.option, solution.multiplier)
        option, proven = core.option, core.proven_optimal
        extra.update({"open_blocks": core.open_blocks, "core_blocks": core.solved_blocks})
    choice = np.zeros(len(problem.units), dtype=int)
    for row, members in enumerate(blocks):
        choice[members] = option[row]
    objective, used, _ = problem.evaluate(tuple(int(k) for k in choice))
    lower_bound = objective if proven else min(solution.lower_bound, objective)
    status = SolverStatus.OPTIMAL if objective - lower_bound <= 1e-12 * max(1.0, abs(objective)) else \
        SolverStatus.FEASIBLE
    message = "proven optimal: LP bound plus an exact solve of the open blocks" if proven else \
        "LP bound from the convex hulls"
    return Allocation(status=status, choice=tuple(int(k) for k in choice), objective=objective,
                      lower_bound=lower_bound, bytes=used, latency=None, solve_s=time.perf_counter() - started,
                      solver="lagrangian", message=message, extra=extra)


def _fill_remaining(upgrades: HullUpgrades, taken: np.ndarray, prefix: int, left: float, *,
                    max_scan: int = 200_000) -> None:
    """After the prefix, take later upgrades that still fit, in efficiency order, keeping hull order per block
    (scanning at most ``max_scan`` of them)."""
    blocked = np.zeros(len(upgrades.start_option), dtype=bool)
    blocked[upgrades.block[prefix]] = True  # its next upgrade did not fit: later ones of that block may not jump
    rest = np.arange(prefix + 1, len(upgrades.block))
    smallest = float(upgrades.delta_bytes[rest].min()) if rest.size else np.inf
    for i in rest[:max_scan]:
        if left + 1e-9 < smallest:
            break
        b = upgrades.block[i]
        if blocked[b]:
            continue
        if upgrades.delta_bytes[i] <= left + 1e-9:
            taken[i] = True
            left -= float(upgrades.delta_bytes[i])
        else:
            blocked[b] = True


def pareto_frontier(problem: AllocationProblem) -> list[dict[str, float]]:
    """Every breakpoint of the convexified distortion-versus-bytes frontier, smallest first; each is an
    integer allocation optimal at its own byte count."""
    sizes, objectives = breakpoints(hull_upgrades(problem))
    return [{"bytes": float(b), "objective": float(o)} for b, o in zip(sizes, objectives, strict=True)]


def breakpoints(upgrades: HullUpgrades) -> tuple[np.ndarray, np.ndarray]:
    """Bytes and objective of the frontier's breakpoints from sorted hull upgrades: the start, then one point
    after each upgrade."""
    sizes = upgrades.base_bytes + np.concatenate([[0.0], np.cumsum(upgrades.delta_bytes)])
    objectives = upgrades.base_distortion + np.concatenate([[0.0], np.cumsum(upgrades.delta_distortion)])
    return sizes, objectives
