"""Allocator benchmark: real SmolLM2-135M instances at layer and at group level, exact solvers side by side, and
the hull solver (with its gap closed exactly) against HiGHS at scale. Prints one JSON object.

    python bench/allocator.py [--skip-highs-50k] [--skip-real] [--samples 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import _own_folder_off_path  # (before any first-party import)
import numpy as np

from bitplan.allocator import AllocationProblem, Budget, Option, Unit, solve_allocation
from bitplan.allocator.core import close_gap
from bitplan.allocator.frontier import exact_frontier
from bitplan.allocator.ilp import solve_ilp
from bitplan.allocator.lagrangian import hull_upgrades_arrays, pareto_frontier, solve_hull

BITS = (2, 3, 4, 8)
GROUP_SIZE = 128


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


def fast_solve(sizes: np.ndarray, costs: np.ndarray, budget: float) -> dict[str, object]:
    """The hull solver alone, then with its gap closed exactly on the open blocks; times of each."""
    (upgrades, solution), hull_s = timed(lambda: (u := hull_upgrades_arrays(sizes, costs), solve_hull(u, budget)))
    core, core_s = timed(close_gap, sizes, costs, budget, solution.option, solution.multiplier)
    return {"hull_s": hull_s, "hull_objective": solution.objective, "lower_bound": solution.lower_bound,
            "certified_gap": (solution.objective - solution.lower_bound) / solution.objective,
            "within_budget": solution.bytes <= budget + 1e-6,
            "closed_s": hull_s + core_s, "closed_objective": core.objective, "proven_optimal": core.proven_optimal,
            "open_blocks": core.open_blocks, "closed_within_budget": core.bytes <= budget + 1e-6}


def fast_against_highs(n_units: int, seed: int, *, run_highs: bool) -> dict[str, object]:
    sizes, costs = random_arrays(n_units, 4, seed)
    budget = float(sizes[:, 0].sum() + 0.45 * (sizes[:, -1].sum() - sizes[:, 0].sum()))
    entry: dict[str, object] = {"units": n_units, "options": 4, **fast_solve(sizes, costs, budget)}
    if run_highs:
        problem = to_problem(sizes, costs, fraction=0.45)
        # HiGHS at its default relative gap (1e-4): the baseline as people run it.
        highs, highs_s = timed(solve_ilp, problem, time_limit_s=600, mip_rel_gap=1e-4)
        entry.update({"highs_mip_rel_gap": 1e-4, "highs_s": highs_s, "highs_status": highs.status.value,
                      "highs_objective": highs.objective,
                      "relative_difference": (entry["closed_objective"] - highs.objective) / highs.objective,
                      "speedup_hull": highs_s / entry["hull_s"], "speedup_closed": highs_s / entry["closed_s"]})
    return entry


def smollm2_sensitivities(samples: int) -> tuple[dict[str, object], dict[str, np.ndarray], dict[str, np.ndarray],
                                                 dict[str, tuple[int, int]], float]:
    """One calibration pass over SmolLM2-135M (built-in text, ``samples`` x 512 tokens): per-layer and per-group
    predicted loss increase (Fisher-weighted output error) at each bit width, and each layer's shape."""
    import torch

    from bitplan.sensitivity.activations import collect_unit_statistics
    from bitplan.sensitivity.groups import group_output_error
    from bitplan.sensitivity.output_error import predict_output_error
    from bitplan.sources.calibration import build_calibration_set
    from bitplan.sources.models import causal_lm_loss, load_model
    from bitplan.sources.units import find_units

    started = time.perf_counter()
    loaded = load_model("smollm2-135m")
    units = find_units(loaded.model)
    calib = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=samples, seq_len=512)
    stats = collect_unit_statistics(loaded.model, units, list(torch.split(calib.tokens, 1)), loss_fn=causal_lm_loss)
    layer, group, shapes = {}, {}, {}
    for name, module in units.items():
        predicted = predict_output_error(module.weight, stats[name], bits_options=BITS, group_size=GROUP_SIZE,
                                         fisher=True)
        layer[name] = np.array([predicted[b] for b in BITS])
        group[name] = group_output_error(module.weight, stats[name], bits_options=BITS, group_size=GROUP_SIZE,
                                         fisher=True).numpy().astype(float)
        shapes[name] = (module.out_features, module.in_features)
    info = {"model": "smollm2-135m", "calibration": f"built-in text, {samples} x 512 tokens",
            "metric": "fisher_output_error", "bits": list(BITS), "group_size": GROUP_SIZE}
    return info, layer, group, shapes, time.perf_counter() - started


def real_layer_level(layer: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], bpw: float,
                     time_limit_s: float) -> dict[str, object]:
    """210 units x 4 bit widths at ``bpw``: every solver on the same instance, and the frontier."""
    from bitplan.quantizer.sizes import quantized_bytes

    numel = sum(o * i for o, i in shapes.values())
    units = tuple(Unit(name=name, options=tuple(
        Option(bits=b, bytes=float(quantized_bytes(*shapes[name], bits=b, group_size=GROUP_SIZE)),
               distortion=float(d)) for b, d in zip(BITS, layer[name], strict=True))) for name in layer)
    problem = AllocationProblem(units=units, budget=Budget(bytes=bpw * numel / 8))
    solvers = {}
    for solver in ("highs", "pulp", "lagrangian", "baq", "cvxpy"):
        result, elapsed = timed(solve_allocation, problem, solver=solver, time_limit_s=time_limit_s)
        solvers[solver] = {"status": result.status.value, "objective": result.objective,
                           "lower_bound": result.lower_bound, "bits_per_weight": 8 * result.bytes / numel,
                           "s": elapsed}
    best = solvers["highs"]["objective"]
    for entry in solvers.values():
        entry["relative_to_highs"] = (entry["objective"] - best) / best
    exact, exact_s = timed(exact_frontier, problem)
    hull, hull_s = timed(pareto_frontier, problem)
    return {"units": len(units), "options": len(BITS), "bits_per_weight_budget": bpw, "solvers": solvers,
            "frontier": {"exact_points": len(exact), "exact_s": exact_s, "hull_points": len(hull), "hull_s": hull_s}}


def real_group_level(group: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], bpw: float,
                     run_highs: bool, time_limit_s: float) -> dict[str, object]:
    """Every (output row, 128-column group) of every layer a unit: sizes are the group's packed bits plus an
    fp16 scale and zero (4 bytes)."""
    sizes, costs = [], []
    for name, (out_features, in_features) in shapes.items():
        widths = np.full(-(-in_features // GROUP_SIZE), GROUP_SIZE)
        widths[-1] = in_features - GROUP_SIZE * (len(widths) - 1)
        group_numel = np.tile(widths, out_features)[:, None]
        sizes.append(group_numel * np.array(BITS)[None, :] / 8 + 4)
        costs.append(group[name])
    sizes_all, costs_all = np.concatenate(sizes), np.concatenate(costs)
    numel = sum(o * i for o, i in shapes.values())
    budget = bpw * numel / 8
    entry: dict[str, object] = {"units": len(sizes_all), "options": len(BITS), "bits_per_weight_budget": bpw,
                                **fast_solve(sizes_all, costs_all, budget)}
    if run_highs:
        problem = AllocationProblem(units=tuple(
            Unit(name=str(i), options=tuple(Option(bits=b, bytes=float(s), distortion=float(c))
                                            for b, s, c in zip(BITS, srow, crow, strict=True)))
            for i, (srow, crow) in enumerate(zip(sizes_all, costs_all, strict=True))), budget=Budget(bytes=budget))
        highs, highs_s = timed(solve_ilp, problem, time_limit_s=time_limit_s, mip_rel_gap=1e-4)
        entry.update({"highs_mip_rel_gap": 1e-4, "highs_time_limit_s": time_limit_s, "highs_s": highs_s,
                      "highs_status": highs.status.value, "highs_objective": highs.objective})
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-highs-50k", action="store_true")
    parser.add_argument("--skip-real", action="store_true", help="no SmolLM2 instances (no model load)")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows for the SmolLM2 instances")
    parser.add_argument("--bpw", type=float, default=3.5)
    parser.add_argument("--group-highs-time-limit", type=float, default=120.0,
                        help="HiGHS time limit on the group-level instance (0 skips it)")
    args = parser.parse_args()
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "allocator", "cpus": os.cpu_count(), "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not args.skip_real:
        info, layer, group, shapes, sensitivity_s = smollm2_sensitivities(args.samples)
        report["smollm2"] = {**info, "sensitivity_s": sensitivity_s,
                             "layer_level": real_layer_level(layer, shapes, args.bpw, time_limit_s=120.0),
                             "group_level": real_group_level(group, shapes, args.bpw,
                                                             run_highs=args.group_highs_time_limit > 0,
                                                             time_limit_s=args.group_highs_time_limit)}
    report.update({"exact_200x6": exact_side_by_side(200, 6, seed=0),
                   "fast_50000x4": fast_against_highs(50_000, seed=1, run_highs=not args.skip_highs_50k),
                   "fast_1000000x4": fast_against_highs(1_000_000, seed=2, run_highs=False)})
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
