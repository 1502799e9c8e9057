"""A job's quality-against-size (or against-latency) frontier, as the API and the dashboard show it.

Every artifact of a job that planned from a sensitivity pass carries its allocation problem
(``allocation-problem.json``: each unit's options with exact bytes and predicted loss increase, ties and pins,
the format of each option). The frontier is computed from that file alone, in the service's own process and
without the model: the predicted Pareto frontier (:func:`bitplan.allocator.frontier.frontier`, the same call as
``bitplan allocate --frontier`` on the same file), the uniform baselines, and the job's materialised points with
their measured quality. A job with a latency budget has each option's decode and prefill milliseconds per token
in that file too (and the fixed part of the latency model): its frontier along decode or prefill time is the hull
of (time, predicted loss), with the bytes of each breakpoint's allocation (:func:`time_frontier`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bitplan.allocator import AllocationProblem, problem_from_json, problem_to_json
from bitplan.allocator.frontier import frontier
from bitplan.allocator.lagrangian import HullUpgrades, block_arrays, breakpoints, hull_upgrades_arrays

PROBLEM_FILE = "allocation-problem.json"
API_POINT_LIMIT = 2_000  # points in one answer at most (evenly spread over the frontier); ?limit= for more
API_EXACT_POINTS = 4_000  # past this many exact points the API answers with the hull's breakpoints (in milliseconds)
AXES = {"bytes": None, "latency": "latency_fixed_ms", "prefill": "prefill_fixed_ms"}  # axis -> its fixed part


class NoTimes(ValueError):
    """The job's allocation problem carries no times on its options (it had no latency budget)."""


def problem_document(problem: AllocationProblem, labels: dict[str, list[str]] | None, numel: int,
                     fixed_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """What ``allocation-problem.json`` holds: the problem as ``bitplan allocate`` reads it, each option's format
    when the job chose among formats, the number of weights its units hold (for bits per weight), and with a
    latency budget the latency model's fixed parts (``latency_fixed_ms``, ``prefill_fixed_ms``)."""
    return {**problem_to_json(problem, labels), "numel": numel, **(fixed_ms or {})}


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
    the set's first format of that width the unit's shape allows, as llama.cpp falls back to a legacy type), with
    its predicted decode and prefill time when the options carry times."""
    bits, sizes, costs = option_arrays(document) if arrays is None else arrays
    rows = np.arange(len(bits))
    times = {key: (float(document.get(AXES[axis] or "", 0.0)), t) for axis, key in (("latency", "latency_ms"),
                                                                                     ("prefill", "prefill_ms"))
             if (t := _times_of(document, axis)) is not None}  # with a latency budget: each baseline's times
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
                       "predicted_loss": float(costs[rows, first].sum()), **({"formats": formats} if formats else {}),
                       **{key: fixed + float(t[rows, first].sum()) for key, (fixed, t) in times.items()}})
    return points


def along_hull(upgrades: HullUpgrades, values: np.ndarray) -> np.ndarray:
    """Total of a second quantity (``values``: per block and option) at each breakpoint of ``upgrades``' walk: each
    upgrade moves its block from the option it held (its start, or its previous upgrade's) to ``to_option``."""
    n = len(upgrades.block)
    rows = np.arange(len(upgrades.start_option))
    order = np.lexsort((np.arange(n), upgrades.block))  # grouped by block, each block's upgrades in hull order
    block, to = upgrades.block[order], upgrades.to_option[order]
    first = np.r_[True, block[1:] != block[:-1]] if n else np.zeros(0, dtype=bool)
    previous = np.empty(n, dtype=np.int64)
    previous[order] = np.where(first, upgrades.start_option[block], np.r_[0, to[:-1]] if n else to)
    delta = values[upgrades.block, upgrades.to_option] - values[upgrades.block, previous]
    return float(values[rows, upgrades.start_option].sum()) + np.concatenate([[0.0], np.cumsum(delta)])


def _times_of(document: dict[str, Any], axis: str) -> np.ndarray | None:
    """Each option's time on ``axis`` as ``option_arrays`` lays them out, ``None`` when an option has none."""
    units = document["units"]
    if any(axis not in o for u in units for o in u["options"]):
        return None
    times = np.full((len(units), max(len(u["options"]) for u in units)), np.inf)
    for row, unit in enumerate(units):
        times[row, :len(unit["options"])] = [o[axis] for o in unit["options"]]
    return times


def time_frontier(document: dict[str, Any], axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time (``axis``: decode ``latency`` or ``prefill`` ms per token, fixed part included), predicted loss and
    bytes at every breakpoint of the hull of (time, predicted loss); ties and pins respected (blocks). Each
    breakpoint is an allocation that is optimal at its own time budget (the hull's LP bound meets it)."""
    times = _times_of(document, axis)
    if times is None:
        raise NoTimes(f"this job's options carry no {axis} times (it had no latency budget); submit with "
                      "--latency-ms-per-token or --prefill-ms-per-token (gguf target) for a frontier along time")
    fixed = float(document.get(AXES[axis] or "", 0.0))
    if _plain(document):
        _, sizes, costs = option_arrays(document)
    else:
        problem = problem_from_json(document)
        blocks, sizes, costs = block_arrays(problem)
        times = np.full(sizes.shape, np.inf)
        for row, block in enumerate(blocks):
            block_times = problem.block_latencies(block, axis)
            times[row, :len(block_times)] = block_times
    upgrades = hull_upgrades_arrays(np.where(np.isfinite(sizes), times, np.inf), costs)
    front_times, front_costs = breakpoints(upgrades)
    return fixed + front_times, front_costs, along_hull(upgrades, sizes)


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
                       "measured_latency_ms": (run.get("latency") or {}).get("measured_ms_per_token"),
                       "prefill_ms": (run.get("latency") or {}).get("predicted_prefill_ms_per_token"),
                       "measured_prefill_ms": (run.get("latency") or {}).get("measured_prefill_ms_per_token")})
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
                 max_points: int = API_EXACT_POINTS, limit: int = API_POINT_LIMIT, axis: str = "bytes"
                 ) -> dict[str, Any]:
    """``{"kind", "axis", "numel", "total_points", "points", "uniform", "measured"}``: the predicted frontier
    (sorted by bytes, or with ``axis`` ``latency``/``prefill`` by that time, which each point then has as
    ``latency_ms``/``prefill_ms``; predicted loss non-increasing; at most ``limit`` of its ``total_points``, evenly
    spread), the uniform baselines (with their times when the options have them) and the measured artifacts."""
    numel = document["numel"]
    arrays = option_arrays(document)
    times: np.ndarray | None = None
    if axis == "bytes":
        sizes, costs, computed = predicted_frontier(document, kind=kind, max_points=max_points, arrays=arrays)
    else:
        if kind == "exact":
            raise ValueError("the frontier along time is the hull's breakpoints: ask for kind=hull or kind=auto")
        times, costs, sizes = time_frontier(document, axis)
        computed = "hull"
    keep = thin(len(sizes), limit)
    points = [{"bytes": b, "bits_per_weight": 8 * b / numel, "predicted_loss": c}
              for b, c in zip(sizes[keep].tolist(), costs[keep].tolist(), strict=True)]
    if times is not None:
        for point, t in zip(points, times[keep].tolist(), strict=True):
            point[f"{axis}_ms" if axis == "prefill" else "latency_ms"] = t
    return {"kind": computed, "axis": axis, "numel": numel, "total_points": int(len(sizes)), "points": points,
            "uniform": uniform_points(document, arrays), "measured": measured_points(runs)}


def frontier_csv(report: dict[str, Any]) -> str:
    """The report as CSV, one row per point: ``series`` is ``predicted``, ``uniform`` or ``measured``."""
    rows = ["series,bytes,bits_per_weight,predicted_loss,kl_mean,ppl,label,latency_ms,prefill_ms"]

    def cell(value: Any) -> str:
        return "" if value is None else (repr(value) if isinstance(value, float) else str(value))

    for series in ("points", "uniform", "measured"):
        name = {"points": "predicted"}.get(series, series)
        for p in report[series]:
            rows.append(",".join([name, *(cell(p.get(k)) for k in ("bytes", "bits_per_weight", "predicted_loss",
                                                                    "kl_mean", "ppl")),
                                  cell(p.get("label") or p.get("artifact")), cell(p.get("latency_ms")),
                                  cell(p.get("prefill_ms"))]))
    return "\n".join(rows) + "\n"
