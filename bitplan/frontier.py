"""A job's quality-against-size frontier, as the API and the dashboard show it.

Every artifact of a job that planned from a sensitivity pass carries its allocation problem
(``allocation-problem.json``: each unit's options with exact bytes and predicted loss increase, ties and pins,
the format of each option). The frontier is computed from that file alone, in the service's own process and
without the model: the predicted Pareto frontier (:func:`bitplan.allocator.frontier.frontier`, the same call as
``bitplan allocate --frontier`` on the same file), the uniform baselines, and the job's materialised points with
their measured quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bitplan.allocator import AllocationProblem, problem_from_json, problem_to_json
from bitplan.allocator.frontier import frontier
from bitplan.allocator.lagrangian import breakpoints, hull_upgrades_arrays

PROBLEM_FILE = "allocation-problem.json"
API_POINT_LIMIT = 2_000  # points in one answer at most (evenly spread over the frontier); ?limit= for more
API_EXACT_POINTS = 4_000  # past this many exact points the API answers with the hull's breakpoints (in milliseconds)


def problem_document(problem: AllocationProblem, labels: dict[str, list[str]] | None, numel: int) -> dict[str, Any]:
    """What ``allocation-problem.json`` holds: the problem as ``bitplan allocate`` reads it, each option's format
    when the job chose among formats, and the number of weights its units hold (for bits per weight)."""
    return {**problem_to_json(problem, labels), "numel": numel}


def write_problem(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / PROBLEM_FILE
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return path


def option_arrays(document: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bits, bytes and predicted loss of every option, ``(units, max options)``, padded with -1 / +inf."""
    units = document["units"]
    width = max(len(u["options"]) for u in units)
    bits = np.full((len(units), width), -1, dtype=np.int64)
    sizes = np.full((len(units), width), np.inf)
    costs = np.full((len(units), width), np.inf)
    if all(len(u["options"]) == width for u in units):  # the common case, without a Python loop per option
        bits[:] = [[o["bits"] for o in u["options"]] for u in units]
        sizes[:] = [[o["bytes"] for o in u["options"]] for u in units]
        costs[:] = [[o["distortion"] for o in u["options"]] for u in units]
        return bits, sizes, costs
    for row, unit in enumerate(units):
        for k, option in enumerate(unit["options"]):
            bits[row, k], sizes[row, k], costs[row, k] = option["bits"], option["bytes"], option["distortion"]
    return bits, sizes, costs


def uniform_points(document: dict[str, Any], arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                   ) -> list[dict[str, Any]]:
    """One point per bit width every unit has: each unit at its first listed option of that width (with formats,
    the set's first format of that width the unit's shape allows, as llama.cpp falls back to a legacy type)."""
    bits, sizes, costs = option_arrays(document) if arrays is None else arrays
    rows = np.arange(len(bits))
    points = []
    for width in sorted(int(w) for w in np.unique(bits) if w >= 0):
        has = bits == width
        if not has.any(axis=1).all():
            continue
        first = has.argmax(axis=1)
        size = float(sizes[rows, first].sum())
        formats = sorted({u["options"][k]["format"] for u, k in zip(document["units"], first.tolist(), strict=True)}
                         ) if "format" in document["units"][0]["options"][0] else []
        points.append({"label": f"uniform {width}-bit", "bits": width, "bytes": size,
                       "bits_per_weight": 8 * size / document["numel"],
                       "predicted_loss": float(costs[rows, first].sum()), **({"formats": formats} if formats else {})})
    return points


def measured_points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's artifacts: size, predicted loss (the solver's objective) and measured quality (held-back windows
    when the job measured them; ``kl_calibration``: the KL check on calibration windows)."""
    points = []
    for run in runs:
        quality = run.get("quality") or {}
        points.append({"artifact": run.get("artifact"), "bytes": run["bytes"],
                       "bits_per_weight": run["bits_per_weight"],
                       "predicted_loss": run.get("objective"), "status": run.get("status"),
                       "kl_mean": quality.get("kl_mean", run.get("kl_divergence")), "kl_p99": quality.get("kl_p99"),
                       "ppl": quality.get("ppl"), "ppl_source": quality.get("ppl_source"),
                       "top1_agreement": quality.get("top1_agreement"), "kl_calibration": run.get("kl_divergence"),
                       "eval_text": quality.get("text"),
                       "latency_ms": (run.get("latency") or {}).get("predicted_ms_per_token"),
                       "measured_latency_ms": (run.get("latency") or {}).get("measured_ms_per_token")})
    return sorted(points, key=lambda p: p["bytes"])


def _plain(document: dict[str, Any]) -> bool:
    """No ties, pins or bounds: every unit is its own block with all its options allowed."""
    return not any(key in unit for unit in document["units"] for key in ("tie", "min_bits", "max_bits"))


def predicted_frontier(document: dict[str, Any], *, kind: str = "auto", max_points: int = API_EXACT_POINTS,
                       arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, str]:
    """Bytes and predicted loss of the frontier's points, and the kind computed. A problem with more units than
    ``max_points`` cannot have a small exact frontier, so ``auto`` goes straight to the hull; a plain one
    (:func:`_plain`) walks the hull from the option arrays, without building the problem's objects (the fast path;
    :func:`bitplan.allocator.frontier.frontier` is its reference)."""
    if kind == "hull" or (kind == "auto" and len(document["units"]) > max_points):
        if _plain(document):
            _, sizes, costs = option_arrays(document) if arrays is None else arrays
            front_sizes, front_costs = breakpoints(hull_upgrades_arrays(sizes, costs))
            return front_sizes, front_costs, "hull"
        kind = "hull"
    points, computed = frontier(problem_from_json(document), kind=kind, max_points=max_points)
    return (np.array([p["bytes"] for p in points]), np.array([p["objective"] for p in points]), computed)


def thin(count: int, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` of ``count`` frontier points, evenly spread, the first and last kept."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, limit)).astype(np.int64))


def job_frontier(document: dict[str, Any], runs: list[dict[str, Any]], *, kind: str = "auto",
                 max_points: int = API_EXACT_POINTS, limit: int = API_POINT_LIMIT) -> dict[str, Any]:
    """``{"kind", "numel", "total_points", "points", "uniform", "measured"}``: the predicted frontier (sorted by
    bytes, predicted loss non-increasing; at most ``limit`` of its ``total_points``, evenly spread), the uniform
    baselines and the measured artifacts."""
    numel = document["numel"]
    arrays = option_arrays(document)
    sizes, costs, computed = predicted_frontier(document, kind=kind, max_points=max_points, arrays=arrays)
    keep = thin(len(sizes), limit)
    return {"kind": computed, "numel": numel, "total_points": int(len(sizes)),
            "points": [{"bytes": b, "bits_per_weight": 8 * b / numel, "predicted_loss": c}
                       for b, c in zip(sizes[keep].tolist(), costs[keep].tolist(), strict=True)],
            "uniform": uniform_points(document, arrays), "measured": measured_points(runs)}


def frontier_csv(report: dict[str, Any]) -> str:
    """The report as CSV, one row per point: ``series`` is ``predicted``, ``uniform`` or ``measured``."""
    rows = ["series,bytes,bits_per_weight,predicted_loss,kl_mean,ppl,label"]

    def cell(value: Any) -> str:
        return "" if value is None else (repr(value) if isinstance(value, float) else str(value))

    for series in ("points", "uniform", "measured"):
        name = {"points": "predicted"}.get(series, series)
        for p in report[series]:
            rows.append(",".join([name, *(cell(p.get(k)) for k in ("bytes", "bits_per_weight", "predicted_loss",
                                                                    "kl_mean", "ppl")),
                                  cell(p.get("label") or p.get("artifact"))]))
    return "\n".join(rows) + "\n"
