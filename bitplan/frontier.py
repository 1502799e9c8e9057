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

from bitplan.allocator import AllocationProblem, problem_from_json, problem_to_json
from bitplan.allocator.frontier import frontier

PROBLEM_FILE = "allocation-problem.json"
API_EXACT_POINTS = 4_000  # past this many exact points the API answers with the hull's breakpoints (in milliseconds)


def problem_document(problem: AllocationProblem, labels: dict[str, list[str]] | None, numel: int) -> dict[str, Any]:
    """What ``allocation-problem.json`` holds: the problem as ``bitplan allocate`` reads it, each option's format
    when the job chose among formats, and the number of weights its units hold (for bits per weight)."""
    return {**problem_to_json(problem, labels), "numel": numel}


def write_problem(folder: Path, document: dict[str, Any]) -> Path:
    path = folder / PROBLEM_FILE
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return path


def uniform_points(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per bit width every unit has: each unit at its first listed option of that width (with formats,
    the set's first format of that width the unit's shape allows, as llama.cpp falls back to a legacy type)."""
    numel = document["numel"]
    widths = None
    for unit in document["units"]:
        have = {o["bits"] for o in unit["options"]}
        widths = have if widths is None else widths & have
    points = []
    for width in sorted(widths or ()):
        chosen = [next(o for o in unit["options"] if o["bits"] == width) for unit in document["units"]]
        size = sum(o["bytes"] for o in chosen)
        formats = sorted({o["format"] for o in chosen if "format" in o})
        points.append({"label": f"uniform {width}-bit", "bits": width, "bytes": size,
                       "bits_per_weight": 8 * size / numel, "predicted_loss": sum(o["distortion"] for o in chosen),
                       **({"formats": formats} if formats else {})})
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
                       "eval_text": quality.get("text")})
    return sorted(points, key=lambda p: p["bytes"])


def job_frontier(document: dict[str, Any], runs: list[dict[str, Any]], *, kind: str = "auto",
                 max_points: int = API_EXACT_POINTS) -> dict[str, Any]:
    """``{"kind", "numel", "points", "uniform", "measured"}``: the predicted frontier (sorted by bytes, predicted
    loss non-increasing), the uniform baselines and the measured artifacts."""
    numel = document["numel"]
    points, computed = frontier(problem_from_json(document), kind=kind, max_points=max_points)
    return {"kind": computed, "numel": numel,
            "points": [{"bytes": p["bytes"], "bits_per_weight": 8 * p["bytes"] / numel,
                        "predicted_loss": p["objective"]} for p in points],
            "uniform": uniform_points(document), "measured": measured_points(runs)}


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
