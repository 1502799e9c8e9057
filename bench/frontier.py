"""How long ``GET /v1/jobs/{id}/frontier`` takes: the frontier of a real job's allocation problem, and of a synthetic
problem of 10^6 groups, through the same call the route makes (:func:`bitplan.report.frontier.job_frontier`: frontier,
uniform baselines, at most 2,000 points returned), against the baseline in the same run: reading the problem into
the allocator's objects and its hull frontier (what ``bitplan allocate --frontier --frontier-kind hull`` does).

The real problem is the ``allocation-problem.json`` an artifact carries (``--problem``), or, without one, that of
a SmolLM2 job run here first (``--formats``, default ``gguf-k``; its sensitivity pass comes from the cache when an
earlier job measured it). Prints one JSON object.

    python bench/frontier.py [--problem ARTIFACT/allocation-problem.json] [--groups 1000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _own_folder_off_path  # (before any first-party import)
import numpy as np

from bitplan.allocator.frontier import frontier
from bitplan.report.frontier import PROBLEM_FILE, job_frontier


def real_problem(formats: str, seconds: dict[str, float]) -> dict[str, Any]:
    """The allocation problem of a SmolLM2 job at 4.5 bits per weight with ``formats``."""
    from bitplan.job.pipeline import run_budgets
    from bitplan.spec import JobSpec

    started = time.perf_counter()
    spec = JobSpec.from_flat(model="smollm2-135m", bits_per_weight=[4.5], formats=formats, num_samples=32,
                             seq_len=512, kl_windows=0)
    with tempfile.TemporaryDirectory() as folder:
        run_budgets(spec, out_dirs=[Path(folder) / "0"])
        document = json.loads((Path(folder) / "0" / PROBLEM_FILE).read_text())
    seconds["job"] = round(time.perf_counter() - started, 1)
    return document


def synthetic(groups: int, seed: int = 0) -> dict[str, Any]:
    """``groups`` units of 128 weights with widths 2/3/4/8 (fp16 scale and zero each) and losses that fall
    4x per bit from a log-normal start."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 2.0, size=groups)
    widths = (2, 3, 4, 8)
    units = [{"name": f"g{i}", "options": [{"bits": b, "bytes": 16 * b + 4, "distortion": float(base[i] * 4.0 ** -b)}
                                           for b in widths]} for i in range(groups)]
    return {"units": units, "budget": {"bytes": groups * 60}, "numel": 128 * groups}


def timed(call: Any, repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return best, result


def measure(document: dict[str, Any], repeat: int) -> dict[str, Any]:
    from bitplan.allocator import problem_from_json

    route_s, report = timed(lambda: job_frontier(document, []), repeat)
    started = time.perf_counter()
    problem = problem_from_json(document)
    parse_s = time.perf_counter() - started
    hull_s, _ = timed(lambda: frontier(problem, kind="hull"), repeat)
    return {"units": len(document["units"]), "options": sum(len(u["options"]) for u in document["units"]),
            "kind": report["kind"], "points": len(report["points"]), "uniform": len(report["uniform"]),
            "total_points": report["total_points"], "route_s": round(route_s, 4),
            "baseline_allocator_hull_s": round(parse_s + hull_s, 4),
            "ratio_route_to_baseline": round(route_s / (parse_s + hull_s), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", type=Path, help="an artifact's allocation-problem.json")
    parser.add_argument("--formats", default="gguf-k", help="candidate set of the job run when --problem is absent")
    parser.add_argument("--groups", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, float] = {}
    document = json.loads(args.problem.read_text()) if args.problem else real_problem(args.formats, seconds)
    started = time.perf_counter()
    big = synthetic(args.groups)
    seconds["build_synthetic"] = round(time.perf_counter() - started, 1)
    result = {"bench": "frontier", "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
              "date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "processor": platform.processor(), "python": platform.python_version(),
              "real": {"source": str(args.problem) if args.problem else f"smollm2-135m job, formats {args.formats}",
                       **measure(document, args.repeat)},
              "synthetic": {"groups": args.groups, **measure(big, max(1, args.repeat // 5))},
              "setup_s": seconds}
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
