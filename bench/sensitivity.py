"""Sensitivity benchmark on SmolLM2-135M: time and peak memory of each metric, and how well each metric's
predicted loss increase at 3 bits ranks the real one (quantize one unit alone, measure the WikiText-2 loss).
Prints one JSON object.

    python bench/sensitivity.py [--units 30] [--windows 8] [--text FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import random
import resource
import sys
import time
from pathlib import Path

import _own_folder_off_path  # noqa: F401  (before any first-party import)
import torch
from scipy.stats import spearmanr

from bitplan.calibration import read_text
from bitplan.evaluation import perplexity, tokenize_for_perplexity
from bitplan.models import load_model
from bitplan.pipeline import RunConfig, measure_sensitivity
from bitplan.units import find_units
from quantizer.rtn import dequantize_weight, quantize_rtn

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
METRICS = ("output_error", "fisher_output_error", "hutchinson")


def _measure_in_child(config: RunConfig, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    started = time.perf_counter()
    result = measure_sensitivity(config)
    queue.put({"result": result.to_json(), "wall_s": time.perf_counter() - started,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def measure_metric(config: RunConfig) -> dict[str, object]:
    """One metric in a fresh process, so its peak memory is its own (model load included)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure_in_child, args=(config, queue))
    process.start()
    payload = queue.get()
    process.join()
    return payload


def mean_loss(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, windows: int) -> float:
    """Mean token NLL over the first ``windows`` windows (the log of the perplexity)."""
    return math.log(perplexity(model, ids, seq_len=seq_len, max_windows=windows).ppl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--units", type=int, default=30)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--bits", type=int, default=3)
    args = parser.parse_args()
    report: dict[str, object] = {
        "benchmark": "sensitivity", "model": args.model, "cpus": os.cpu_count(), "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "real_loss": {"text": str(args.text), "windows": args.windows, "seq_len": args.seq_len, "bits": args.bits,
                      "group_size": 128},
    }
    metrics = {}
    for metric in METRICS:
        config = RunConfig(model=args.model, out_dir=Path("."), bits_per_weight=4.0, metric=metric,
                           num_samples=args.samples)
        metrics[metric] = measure_metric(config)
    loaded = load_model(args.model)
    units = find_units(loaded.model)
    sample = sorted(random.Random(0).sample(list(units), args.units), key=list(units).index)
    ids = tokenize_for_perplexity(loaded.tokenizer, read_text(args.text))
    base = mean_loss(loaded.model, ids, args.seq_len, args.windows)
    real = {}
    for name in sample:
        weight = units[name].weight.data.clone()
        units[name].weight.data = dequantize_weight(quantize_rtn(weight, bits=args.bits, group_size=128))
        real[name] = mean_loss(loaded.model, ids, args.seq_len, args.windows) - base
        units[name].weight.data = weight
    table = {}
    for metric, payload in metrics.items():
        predicted = {u["name"]: u["delta_loss"][str(args.bits)] for u in payload["result"]["units"]}
        rho = spearmanr([predicted[n] for n in sample], [real[n] for n in sample]).statistic
        table[metric] = {"spearman": float(rho), "wall_s": round(payload["wall_s"], 1),
                         "sensitivity_s": round(payload["result"]["seconds"], 1),
                         "peak_rss_gb": round(payload["peak_rss_gb"], 2), "warnings": payload["result"]["warnings"]}
    report["base_loss"] = base
    report["units"] = [{"name": n, "real_delta_loss": real[n]} for n in sample]
    report["metrics"] = table
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
