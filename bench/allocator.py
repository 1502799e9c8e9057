"""Allocator benchmark: exact solvers side by side, and the hull solver against HiGHS at scale.
Prints one JSON object.

    python bench/allocator.py [--skip-highs-50k]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import _own_folder_off_path  # noqa: F401  (before any first-party import)
import numpy as np

from allocator import AllocationProblem, Budget, Option, Unit, solve_allocation
from allocator.ilp import solve_ilp
from allocator.lagrangian import hull_upgrades_arrays, solve_hull


def random_arrays(n_units: int, n_options: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantization-like options: bytes grow with bits, distortion ~ c * 4^-bits with per-unit noise."""
    rng = np.random.default_rng(seed)
    bits = np.arange(2, 2 + n_options)
    numel = rng.integers(1_000, 100_000, size=(n_units, 1))
    sizes = (numel * bits / 8 + 4 * np.ceil(numel / 128)).astype(float)
    scale = rng.lognormal(0.0, 2.0, size=(n_units, 1))
    costs = scale * numel * 4.0 ** -bits * rng.uniform(0.7, 1.3, size=(n_units, n_options))
    return sizes, costs


def to_problem(sizes: np.ndarray, costs: np.ndarray, fraction: float) -> AllocationProblem:
    units = tuple(Unit(name=f"u{i}", options=tuple(Option(bits=2 + k, bytes=float(s), distortion=float(c))
                                                   for k, (s, c) in enumerate(zip(srow, crow, strict=True))))
                  for i, (srow, crow) in enumerate(zip(sizes, costs, strict=True)))
    low, high = sizes.min(axis=1).sum(), sizes.max(axis=1).sum()
    return AllocationProblem(units=units, budget=Budget(bytes=float(low + fraction * (high - low))))


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def exact_side_by_side(n_units: int, n_options: int, seed: int) -> dict[str, object]:
    problem = to_problem(*random_arrays(n_units, n_options, seed), fraction=0.45)
    highs, highs_s = timed(solve_allocation, problem, solver="highs")
    pulp, pulp_s = timed(solve_allocation, problem, solver="pulp")
    return {"units": n_units, "options": n_options, "highs_objective": highs.objective,
            "pulp_objective": pulp.objective, "same_objective": abs(highs.objective - pulp.objective)
            <= 1e-6 * abs(highs.objective), "highs_s": highs_s, "pulp_s": pulp_s, "pulp_over_highs": pulp_s / highs_s}


def fast_against_highs(n_units: int, seed: int, *, run_highs: bool) -> dict[str, object]:
    sizes, costs = random_arrays(n_units, 4, seed)
    budget = float(sizes[:, 0].sum() + 0.45 * (sizes[:, -1].sum() - sizes[:, 0].sum()))
    (upgrades, solution), fast_s = timed(lambda: (u := hull_upgrades_arrays(sizes, costs), solve_hull(u, budget)))
    entry: dict[str, object] = {"units": n_units, "options": 4, "fast_s": fast_s, "fast_objective": solution.objective,
                                "lower_bound": solution.lower_bound,
                                "certified_gap": (solution.objective - solution.lower_bound) / solution.objective,
                                "within_budget": solution.bytes <= budget}
    if run_highs:
        problem = to_problem(sizes, costs, fraction=0.45)
        # HiGHS at its default relative gap (1e-4): the baseline as people run it.
        highs, highs_s = timed(solve_ilp, problem, time_limit_s=600, mip_rel_gap=1e-4)
        entry.update({"highs_mip_rel_gap": 1e-4, "highs_s": highs_s, "highs_status": highs.status.value,
                      "highs_objective": highs.objective,
                      "relative_difference": (solution.objective - highs.objective) / highs.objective,
                      "speedup": highs_s / fast_s})
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-highs-50k", action="store_true")
    args = parser.parse_args()
    report = {"benchmark": "allocator", "cpus": os.cpu_count(), "command": " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "exact_200x6": exact_side_by_side(200, 6, seed=0),
              "fast_50000x4": fast_against_highs(50_000, seed=1, run_highs=not args.skip_highs_50k),
              "fast_1000000x4": fast_against_highs(1_000_000, seed=2, run_highs=False)}
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
