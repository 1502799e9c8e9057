"""The distortion-versus-bytes Pareto frontier, from one call.

* ``hull``: the breakpoints of the frontier's lower convex hull, from the hull solver's one sort (any size; each
  point is an integer allocation optimal at its own byte count).
* ``exact``: every Pareto-optimal integer allocation, by a dynamic program that merges one block at a time and
  drops dominated (bytes, distortion) pairs; exact but its size grows with the problem, so it is capped.
"""

from __future__ import annotations

import numpy as np

from bitplan.allocator.lagrangian import block_arrays, pareto_frontier
from bitplan.allocator.problem import AllocationProblem

EXACT_POINT_LIMIT = 1_000_000


class FrontierTooLarge(ValueError):
    """The exact frontier would exceed the point limit."""


def _pareto(sizes: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points no other point beats in both bytes and distortion, by increasing bytes (decreasing distortion)."""
    order = np.lexsort((costs, sizes))
    sizes, costs = sizes[order], costs[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], costs[:-1]]))
    keep = costs < best_before
    return sizes[keep], costs[keep]


def exact_frontier(problem: AllocationProblem, *, max_points: int | None = None) -> list[dict[str, float]]:
    """Every Pareto-optimal (bytes, objective) pair over integer allocations, smallest bytes first
    (``FrontierTooLarge`` past ``max_points``, default ``EXACT_POINT_LIMIT``)."""
    limit = EXACT_POINT_LIMIT if max_points is None else max_points
    _, sizes, costs = block_arrays(problem)
    front_sizes, front_costs = np.zeros(1), np.zeros(1)
    for row in range(len(sizes)):
        allowed = np.isfinite(sizes[row])
        merged_sizes = (front_sizes[:, None] + sizes[row, allowed][None, :]).ravel()
        merged_costs = (front_costs[:, None] + costs[row, allowed][None, :]).ravel()
        front_sizes, front_costs = _pareto(merged_sizes, merged_costs)
        if len(front_sizes) > limit:
            raise FrontierTooLarge(f"the exact frontier passed {limit} points after {row + 1} of {len(sizes)} "
                                   "blocks; use the hull frontier")
    return [{"bytes": float(b), "objective": float(c)} for b, c in zip(front_sizes, front_costs, strict=True)]


def frontier(problem: AllocationProblem, *, kind: str = "auto", max_points: int | None = None
             ) -> tuple[list[dict[str, float]], str]:
    """The frontier of the requested ``kind`` (``auto``: exact when under the point limit ``max_points``, else
    hull), and the kind computed."""
    if kind not in ("auto", "exact", "hull"):
        raise ValueError(f"unknown frontier kind {kind!r}; choose auto, exact or hull")
    if kind in ("auto", "exact"):
        try:
            return exact_frontier(problem, max_points=max_points), "exact"
        except FrontierTooLarge:
            if kind == "exact":
                raise
    return pareto_frontier(problem), "hull"
