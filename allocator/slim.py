"""SliM-LLM's salience-determined group allocation inside one layer, and the same as a generic knapsack.

SliM-LLM keeps a layer's average at ``b`` bits: groups ranked by salience, the ``k`` most salient get ``b + 1``
bits, the ``k`` least salient ``b - 1``, the rest ``b``, with ``k`` searched to minimize the layer's error. The
generic problem (every group a unit with options ``b - 1, b, b + 1`` and the layer's bytes at ``b`` as budget)
contains every one of those allocations, so the generic solver is never worse, and equal when the distortions
follow the salience order.
"""

from __future__ import annotations

import numpy as np

from bitplan.allocator.problem import AllocationProblem, Budget, Option, Unit


def salience_search(distortion: np.ndarray, salience: np.ndarray) -> np.ndarray:
    """SliM-LLM's search. ``distortion (n_groups, 3)``: each group's cost at ``b - 1, b, b + 1`` bits.
    Returns the offset (-1, 0 or +1) of each group's bits from ``b``."""
    n_groups = len(salience)
    order = np.argsort(-salience, kind="stable")  # most salient first
    up_gain = distortion[order, 1] - distortion[order, 2]  # saved by moving the k-th most salient up
    down_loss = distortion[order[::-1], 0] - distortion[order[::-1], 1]  # paid by moving the k-th least down
    totals = np.concatenate([[0.0], np.cumsum(down_loss[: n_groups // 2] - up_gain[: n_groups // 2])])
    k = int(np.argmin(totals))
    offset = np.zeros(n_groups, dtype=int)
    offset[order[:k]] = 1
    offset[order[::-1][:k]] = -1
    return offset


def within_layer_problem(distortion: np.ndarray, bits: int, group_numel: int, *, overhead_bytes: float = 4.0,
                         name: str = "layer") -> AllocationProblem:
    """Groups of one layer as units with options ``bits - 1, bits, bits + 1`` and the layer's size at ``bits``
    as the budget (its average kept)."""
    units = tuple(
        Unit(name=f"{name}.group{g}", options=tuple(
            Option(bits=b, bytes=group_numel * b / 8 + overhead_bytes, distortion=float(distortion[g, i]))
            for i, b in enumerate((bits - 1, bits, bits + 1))))
        for g in range(len(distortion)))
    budget = len(distortion) * (group_numel * bits / 8 + overhead_bytes)
    return AllocationProblem(units=units, budget=Budget(bytes=budget))
