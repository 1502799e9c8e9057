"""What the candidate format sets cost: one job per set on the same model, budget and calibration, none reusing
a cached sensitivity (a first job), timed stage by stage. Prints one JSON object with every
job's stage times and its total against the first set's (``ratio_to_first``; the issue's bound is 1.5x
today's default, ``bitplan-default``).

    python bench/cost.py [--sets bitplan-default:rtn,bitplan-default:rtn-salience,gguf-k,bitplan-int] [--bpw 5.0]

A set may name its encoder after a colon (``bitplan-default:rtn``); without one it takes ``--quantizer``.
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

import _own_folder_off_path  # noqa: F401  (before any first-party import)
import torch

from bitplan.pipeline import run_budgets
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
        "benchmark": "cost", "model": args.model, "quantizer": args.quantizer, "bits_per_weight": args.bpw,
        "calibration": f"built-in text, {args.samples} x {args.seq_len} tokens",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    jobs = []
    for entry in args.sets.split(","):
        name, _, quantizer = entry.partition(":")
        spec = JobSpec.from_flat(model=args.model, bits_per_weight=args.bpw, formats=name,
                                 quantizer=quantizer or args.quantizer, num_samples=args.samples, seq_len=args.seq_len)
        started = time.perf_counter()
        run = run_budgets(spec, out_dirs=[args.out / entry.replace(":", "-")], use_cache=False)[0]  # nothing reused
        wall = round(time.perf_counter() - started, 1)
        jobs.append({"formats": name, "quantizer": spec.quantization.quantizer.value, "wall_s": wall,
                     "timings_s": run.timings_s, "bits_per_weight": run.bits_per_weight, "kl": run.kl_divergence,
                     "quality": run.quality})
        sys.stderr.write(json.dumps(jobs[-1]) + "\n")  # each job as it ends: a stopped run keeps what it measured
    for job in jobs:
        job["ratio_to_first"] = round(job["wall_s"] / jobs[0]["wall_s"], 3)
    report["jobs"] = jobs
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
