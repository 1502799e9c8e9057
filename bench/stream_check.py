"""Streaming changes no result: the default job's sensitivity pass on a real model, once over the whole model
(the reference) and once streamed block by block, on the same calibration; the per-unit predictions compared,
and the allocations the two give at each budget. Prints one JSON object.

    python bench/stream_check.py [--model smollm2-135m] [--samples 32] [--bpw 3,3.5,4]

The two passes run one after the other in one process (their times compare within the run); each one's peak
resident memory is not separable in one process, so only times are reported here (bench/scale.py measures memory
in a process of its own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.job.pipeline import head_units
from bitplan.job.planning import budgets_in_bytes, make_plans, unit_sizes
from bitplan.job.sensitivity_pass import resolve_metric, run_sensitivity, salience_width_errors
from bitplan.sensitivity.importance import input_energy
from bitplan.sources.calibration import build_calibration_set
from bitplan.sources.models import load_model
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bpw", default="3,3.5,4")
    parser.add_argument("--target", default=None, help="the job's target (default: the job's default)")
    args = parser.parse_args()
    budgets = [float(b) for b in args.bpw.split(",")]
    flat = {"model": args.model, "bits_per_weight": budgets, "num_samples": args.samples, "seq_len": args.seq_len}
    if args.target:
        flat["target"] = args.target
    spec = JobSpec.from_flat(**flat)
    loaded = load_model(spec.model)
    units = find_units(loaded.model)
    assert not head_units(spec, loaded), "a whole-file budget's head units are measured by the whole-model pass"
    calibration = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=args.samples,
                                        seq_len=args.seq_len, seed=spec.calibration.seed)
    metric = resolve_metric(spec.sensitivity.metric.value, loaded.kind, spec.quantization.target.value)
    importance = None
    if spec.quantization.format_names is not None or salience_width_errors(spec, metric):
        importance = input_energy(loaded.model, units, list(torch.split(calibration.tokens, 1)))
    results, seconds = {}, {}
    for label, stream in (("whole", False), ("streamed", True)):
        started = time.perf_counter()
        results[label] = run_sensitivity(spec, loaded, units, metric, calibration.tokens, None,
                                         importance=importance, stream=stream)
        seconds[label] = round(time.perf_counter() - started, 2)
        sys.stderr.write(f"{label}: {seconds[label]} s\n")
    whole = {u.name: u.delta_loss for u in results["whole"].units}
    streamed = {u.name: u.delta_loss for u in results["streamed"].units}
    differences = []
    for name, options in whole.items():
        scale = max(abs(v) for v in options.values()) or 1.0
        differences += [abs(streamed[name][key] - value) / scale for key, value in options.items()]
    sizes = unit_sizes(units, spec.widths, spec.quantization.group_size, spec.quantization.format_names,
                       spec.quantization.target.value)
    numel = sum(m.weight.numel() for m in units.values())
    in_bytes = budgets_in_bytes(spec, sizes, numel, None)
    plans = {label: make_plans(spec, units, sizes, result, in_bytes, None) for label, result in results.items()}
    allocations = []
    for budget, ours, reference in zip(budgets, plans["streamed"], plans["whole"], strict=True):
        chosen = ours.formats or ours.bits
        expected = reference.formats or reference.bits
        allocations.append({
            "bits_per_weight": budget, "units_differing": sum(chosen[n] != expected[n] for n in expected),
            "objective_whole": reference.solver.objective, "objective_streamed": ours.solver.objective,
            "objective_relative_difference": abs(ours.solver.objective - reference.solver.objective)
            / max(abs(reference.solver.objective), 1e-12)})
    report = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "stream_check", "model": args.model, "metric": metric.value,
        "formats": list(spec.quantization.format_names or []), "target": spec.quantization.target.value,
        "calibration": f"built-in text, {args.samples} x {args.seq_len} tokens", "command": " ".join(sys.argv),
        "torch_threads": torch.get_num_threads(), "seconds": seconds,
        "time_ratio_streamed_to_whole": round(seconds["streamed"] / seconds["whole"], 3),
        "predictions": {"count": len(differences), "max_relative_difference": max(differences),
                        "median_relative_difference": sorted(differences)[len(differences) // 2]},
        "allocations": allocations,
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
