"""The gguf target's latency model and latency budgets, measured through llama.cpp on this machine.

1. **The model's accuracy.** Fitting variants (the design ``bitplan latency`` uses) and ``--test`` random per-tensor
   mixtures it is not fitted on are written as GGUF files of SmolLM2 and timed together, interleaved (every file
   once per round, A B A B ...), medians over ``--rounds``; the table is fitted on the fitting variants only and
   its median error on the test mixtures reported. The table is stored as this machine's cached one.
2. **A decode-latency budget** halfway between the fastest and the slowest uniform variant (each legacy GGML type
   on every tensor): a gguf-k job under it; its GGUF is timed interleaved with the uniform variants, and its KL
   to the source model on WikiText-2 windows (the same scoring as ``bench/peers.py``) is compared with every
   uniform variant measured at least as fast.
3. **Latency and size together**: the same budget with a bits-per-weight budget that binds as well; both checked
   on the written file.

Prints one JSON object.

    python bench/latency.py [--rounds 5] [--test 6] [--windows 16] [--out runs/latency]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.job.pipeline import GGUF_FILE, run_budgets
from bitplan.job.planning import legal_for_target, unit_sizes
from bitplan.quantizer.formats import resolve_formats
from bitplan.report.evaluation import tokenize_for_perplexity
from bitplan.report.latency import (
    DECODE_TOKENS,
    PROMPT_TOKENS,
    LatencyTable,
    fingerprint,
    fit,
    numel_by_type,
    random_mixtures,
    store_table,
    time_files,
    variant_assignments,
    write_variants,
)
from bitplan.sources.calibration import read_text
from bitplan.sources.models import load_model, resolve_reference
from bitplan.sources.units import find_units
from bitplan.spec import JobSpec

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


peers = _own_folder_off_path.sibling("peers")
BLOCK_LINEAR, DEFAULT_TEXT, block_linear = peers.BLOCK_LINEAR, peers.DEFAULT_TEXT, peers.block_linear
score, window_logprobs = peers.score, peers.window_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="gguf-k")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--test", type=int, default=6, help="random mixtures the fit does not see")
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 512 tokens for the KL")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--evaluator", choices=("torch", "llama.cpp"), default="llama.cpp",
                        help="what runs every file for the KL: llama.cpp itself (the source's llama.cpp logits are "
                             "the reference) or transformers + torch")
    parser.add_argument("--out", type=Path, default=Path("runs/latency"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "latency", "model": args.model, "formats": args.formats, "rounds": args.rounds,
        "prompt_tokens": PROMPT_TOKENS, "decode_tokens": DECODE_TOKENS, "machine": fingerprint(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)}
    loaded = load_model(args.model)
    units = find_units(loaded.model)
    shapes = {name: (m.out_features, m.in_features) for name, m in units.items()}
    numel = {name: m.weight.numel() for name, m in units.items()}
    names = resolve_formats(args.formats) or ()
    used = {f for options in unit_sizes(units, (), 8, names, "gguf").values() for f in options}
    types = [f for f in names if f in used]

    def legal(fmt: str, shape: tuple[int, int]) -> bool:
        return legal_for_target("gguf", fmt, shape)

    design = variant_assignments(shapes, types, legal, mixtures=4, seed=0)
    tests = random_mixtures(shapes, types, legal, count=args.test, seed=12345)
    every = design + tests  # the uniform variants (one legacy type everywhere) are among the fitting variants
    written = time.perf_counter()
    paths = write_variants(loaded, args.model, every, args.out)
    report["variants_written_s"] = round(time.perf_counter() - written, 1)
    timed = time_files(paths, rounds=args.rounds)
    counts = [numel_by_type(a, numel) for a in every]
    n_fit, n_test = len(design), len(tests)
    decode_fixed, decode = fit(types, counts[:n_fit], [t["decode_ms"] for t in timed[:n_fit]])
    prefill_fixed, prefill = fit(types, counts[:n_fit], [t["prefill_ms"] for t in timed[:n_fit]])
    table = LatencyTable(fingerprint=fingerprint(), model_sha256=loaded.source_sha256, types=types,
                         decode_fixed_ms=decode_fixed, decode_ms_per_mweight=decode, prefill_fixed_ms=prefill_fixed,
                         prefill_ms_per_mweight=prefill)
    table = LatencyTable(**{**asdict(table), "fit": {"variants": n_fit, "rounds": args.rounds,
                                                      "source": "bench/latency.py"}})
    store_table(table)
    test_rows = []
    for assignment, count, measured in zip(tests, counts[n_fit:n_fit + n_test], timed[n_fit:n_fit + n_test],
                                           strict=True):
        predicted = table.predict(count)
        predicted_prefill = table.predict(count, prefill=True)
        test_rows.append({"types": {t: sum(1 for f in assignment.values() if f == t) for t in types},
                          "measured_decode_ms": measured["decode_ms"], "predicted_decode_ms": predicted,
                          "decode_error_pct": 100 * (predicted - measured["decode_ms"]) / measured["decode_ms"],
                          "measured_prefill_ms": measured["prefill_ms"], "predicted_prefill_ms": predicted_prefill,
                          "prefill_error_pct": 100 * (predicted_prefill - measured["prefill_ms"])
                          / measured["prefill_ms"],
                          "round_spread_pct": measured["decode_spread_pct"]})
    report["table"] = table.to_json()
    report["fit_variants"] = [{"decode_ms": t["decode_ms"], "predicted_ms": table.predict(c)}
                              for t, c in zip(timed[:n_fit], counts[:n_fit], strict=True)]
    report["test_mixtures"] = test_rows
    report["median_abs_decode_error_pct"] = statistics.median(abs(r["decode_error_pct"]) for r in test_rows)
    report["median_abs_prefill_error_pct"] = statistics.median(abs(r["prefill_error_pct"]) for r in test_rows)
    uniform_index = {t: i for i, a in enumerate(design) for t in LEGACY if set(a.values()) == {t}}
    uniform_paths = [paths[i] for i in uniform_index.values()]
    uniform_ms = {t: timed[i]["decode_ms"] for t, i in uniform_index.items()}
    fastest, slowest = min(uniform_ms.values()), max(uniform_ms.values())
    budget = (fastest + slowest) / 2
    report["uniform_decode_ms"] = uniform_ms
    report["latency_budget_ms"] = budget

    # 2 and 3: jobs under the budget (one sensitivity pass: the second job's comes from the cache)
    numel_total = sum(numel.values())
    q8 = unit_sizes(units, (), 8, ("Q8_0",), "gguf")
    q8_bpw = 8 * sum(s["Q8_0"] for s in q8.values()) / numel_total
    jobs = {"latency": JobSpec.from_flat(model=args.model, target="gguf", formats=args.formats,
                                          latency_ms_per_token=budget)}
    del loaded, units
    gc.collect()
    run_latency = run_budgets(jobs["latency"], out_dirs=[args.out / "job-latency"])[0]
    size_bpw = round(0.9 * run_latency.bits_per_weight, 3)  # a size budget that binds too
    jobs["latency+size"] = JobSpec.from_flat(model=args.model, target="gguf", formats=args.formats,
                                             latency_ms_per_token=budget, bits_per_weight=size_bpw)
    run_both = run_budgets(jobs["latency+size"], out_dirs=[args.out / "job-both"])[0]
    job_paths = [Path(run_latency.artifact) / GGUF_FILE, Path(run_both.artifact) / GGUF_FILE]
    again = time_files([*job_paths, *uniform_paths], rounds=args.rounds)  # interleaved with the uniform variants
    uniform_again = {t: m["decode_ms"] for t, m in zip(uniform_ms, again[2:], strict=True)}

    source = resolve_reference(args.model)[1]
    base = load_model(args.model)
    ids = tokenize_for_perplexity(base.tokenizer, read_text(args.text))
    windows = [ids[i * 512:(i + 1) * 512] for i in range(args.windows)]
    if args.evaluator == "llama.cpp":
        del base
        reference = peers.llama_cpp_logprobs(Path(source), windows)[0]
    else:
        reference = window_logprobs(base.model, windows)
        del base
    gc.collect()
    as_fast = [t for t, ms in uniform_again.items() if ms <= again[0]["decode_ms"]]
    uniform_scores = {t: score(p, windows, reference, args.evaluator)
                      for t, p in zip(uniform_ms, uniform_paths, strict=True) if t in as_fast}
    latency_score = score(job_paths[0], windows, reference, args.evaluator)
    report["latency_job"] = {
        "predicted_ms": run_latency.latency["predicted_ms_per_token"], "measured_ms": again[0]["decode_ms"],
        "within_budget_or_5pct": again[0]["decode_ms"] <= 1.05 * budget, "bits_per_weight": run_latency.bits_per_weight,
        "types": block_linear(job_paths[0])[2], **latency_score,
        "uniform_at_least_as_fast": {t: {"decode_ms": uniform_again[t], **uniform_scores[t]} for t in as_fast},
        "kl_lower_than_every_uniform_at_least_as_fast": all(latency_score["kl_mean"] < s["kl_mean"]
                                                            for s in uniform_scores.values())}
    report["latency_and_size_job"] = {
        "bits_per_weight_budget": size_bpw, "bits_per_weight": run_both.bits_per_weight,
        "size_met": run_both.bits_per_weight <= size_bpw + 1e-9,
        "predicted_ms": run_both.latency["predicted_ms_per_token"],
        "measured_ms": again[1]["decode_ms"], "latency_met_within_5pct": again[1]["decode_ms"] <= 1.05 * budget,
        "types": block_linear(job_paths[1])[2],
        "kl_mean": score(job_paths[1], windows, reference, args.evaluator)["kl_mean"]}
    report["uniform_decode_ms_second_session"] = uniform_again
    report["q8_0_bits_per_weight"] = q8_bpw
    report["source"] = str(source)
    report["evaluator"] = args.evaluator
    report["block_linear_pattern"] = BLOCK_LINEAR.pattern
    report["torch_threads"] = torch.get_num_threads()
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
