"""What the candidate format sets cost: one job per set on the same model, budget and calibration, none reusing
a cached sensitivity (a first job), timed stage by stage. Prints one JSON object with every
job's stage times and its total against the first set's (``ratio_to_first``) and against today's default, a job
without ``--formats`` under the default quantizer (``ratio_to_default``; the issue's bound is 1.5x).

    python bench/cost.py [--sets bitplan-default:rtn,bitplan-default:rtn-salience,gguf-k,bitplan-int] [--bpw 5.0]

A set may name its encoder after a colon (``bitplan-default:rtn``); without one it takes ``--quantizer``. A set
may end in ``@float32`` or ``@bfloat16``: the precision of the token metric's per-token products (default
``auto``); the JSON then also gives the largest relative difference of its predictions from the same set's
``auto`` job in the run, and whether the two chose the same format for every layer. A set may name its sensitivity
metric after a plus (``bitplan-default:rtn-salience+token_taylor``, before any ``@``; default: the job's default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.job.pipeline import run_budgets
from bitplan.spec import JobSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sets", default="bitplan-default:rtn,bitplan-default:rtn-salience,gguf-k,bitplan-int")
    parser.add_argument("--quantizer", default="rtn-salience", help="the encoder of a set that names none")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bpw", type=float, default=5.0, help="a budget every set can meet")
    parser.add_argument("--out", type=Path, default=Path("runs/cost"))
    args = parser.parse_args()
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "cost", "model": args.model, "quantizer": args.quantizer, "bits_per_weight": args.bpw,
        "calibration": f"built-in text, {args.samples} x {args.seq_len} tokens",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    jobs = []
    predictions: dict[str, dict[str, dict[str, float]]] = {}
    formats: dict[str, dict[str, str]] = {}
    for entry in args.sets.split(","):
        entry, _, precision = entry.partition("@")
        named, _, metric = entry.partition("+")
        name, _, quantizer = named.partition(":")
        spec = JobSpec.from_flat(model=args.model, bits_per_weight=args.bpw, formats=name,
                                 quantizer=quantizer or args.quantizer, num_samples=args.samples, seq_len=args.seq_len,
                                 precision=precision or "auto", metric=metric or "auto")
        started = time.perf_counter()
        out = args.out / (entry.replace(":", "-").replace("+", "-") + (f"-{precision}" if precision else ""))
        run = run_budgets(spec, out_dirs=[out], use_cache=False)[0]  # nothing reused
        wall = round(time.perf_counter() - started, 1)
        job = {"formats": name, "quantizer": spec.quantization.quantizer.value, "metric": run.metric,
               "precision": spec.sensitivity.precision.value, "wall_s": wall, "timings_s": run.timings_s,
               "bits_per_weight": run.bits_per_weight, "kl": run.kl_divergence, "quality": run.quality}
        key = f"{name}:{job['quantizer']}+{run.metric}"
        problem = json.loads((out / "allocation-problem.json").read_text())  # every option's predicted increase
        told = {u["name"]: {str(o.get("format") or o["bits"]): o["distortion"] for o in u["options"]}
                for u in problem["units"]}
        chosen = {u["name"]: str(u.get("format") or u["bits"]) for u in run.units}
        if precision and key in predictions:  # against the same set's auto job earlier in the run
            base = predictions[key]
            differences = [abs(v - base[u][k]) / max(abs(base[u][k]), 1e-12) for u, by_key in told.items()
                           for k, v in by_key.items()]
            job["max_relative_difference_of_predictions"] = max(differences)
            job["median_relative_difference_of_predictions"] = sorted(differences)[len(differences) // 2]
            job["same_formats_as_auto"] = chosen == formats[key]
        elif not precision:
            predictions[key], formats[key] = told, chosen
        jobs.append(job)
        sys.stderr.write(json.dumps(jobs[-1]) + "\n")  # each job as it ends: a stopped run keeps what it measured
    default = JobSpec.from_flat(model=args.model, bits_per_weight=args.bpw).quantization.quantizer.value
    baseline = next((j for j in jobs if j["formats"] == "bitplan-default" and j["quantizer"] == default
                     and j["precision"] == "auto"), None)  # a job without --formats: today's default
    for job in jobs:
        job["ratio_to_first"] = round(job["wall_s"] / jobs[0]["wall_s"], 3)
        if baseline is not None:
            job["ratio_to_default"] = round(job["wall_s"] / baseline["wall_s"], 3)
    report["jobs"] = jobs
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
