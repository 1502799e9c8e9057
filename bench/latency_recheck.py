"""The decode-latency budget check of ``bench/latency.py`` again, on the files it wrote, with every uniform variant
scored: the budget job's GGUF (and the latency-and-size job's) timed interleaved with every uniform legacy
variant over more rounds, and every one of them scored by llama.cpp on the same WikiText-2 windows (KL to the
source's llama.cpp logits), so that "lower KL than every uniform variant at least as fast" is read off one table
whatever the timing noise between sessions.

    python bench/latency_recheck.py --run runs/latency --result bench/results/latency-....json [--rounds 9]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import numpy as np
import torch

from bitplan.report.evaluation import tokenize_for_perplexity
from bitplan.report.latency import fingerprint, time_files
from bitplan.sensitivity.kl import per_token_kl
from bitplan.sources.calibration import read_text
from bitplan.sources.models import load_model, resolve_reference

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


peers = _own_folder_off_path.sibling("peers")


def llama_cpp_rows(path: Path, windows: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each window's next-token log-probabilities as llama.cpp computes them, one window at a time."""
    import llama_cpp

    runtime = llama_cpp.Llama(model_path=str(path), n_ctx=len(windows[0]), n_batch=len(windows[0]),
                              logits_all=True, n_threads=os.cpu_count(), verbose=False)
    try:
        for window in windows:
            runtime.reset()
            runtime.eval(window.tolist())
            yield torch.log_softmax(torch.from_numpy(runtime.scores[: len(window)].copy()).float(), dim=-1)
    finally:
        runtime.close()


def stream_score(path: Path, windows: list[torch.Tensor], reference: np.ndarray) -> dict[str, float]:
    """``peers.score`` with llama.cpp, a window at a time against a reference kept on disk (a 262k vocabulary's
    log-probabilities over 16 windows of 512 take 8.6 GB: held twice, they do not fit beside other work)."""
    started = time.perf_counter()
    kls, nll, tokens = [], 0.0, 0
    for index, (window, logprobs) in enumerate(zip(windows, llama_cpp_rows(path, windows), strict=True)):
        kls.append(per_token_kl(torch.from_numpy(np.array(reference[index])), logprobs))
        nll += float(-logprobs[:-1].gather(1, window[1:, None]).sum())
        tokens += window.numel() - 1
    every = torch.cat(kls)
    return {"kl_mean": float(every.mean()), "kl_p99": float(torch.quantile(every.double(), 0.99)),
            "ppl": math.exp(nll / tokens), "eval_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the --out folder of bench/latency.py")
    parser.add_argument("--result", type=Path, required=True, help="its JSON (model, budget)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--text", type=Path, default=peers.DEFAULT_TEXT)
    parser.add_argument("--no-timing", action="store_true",
                        help="score only; the decode times are the result JSON's second (interleaved) session")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/latency-recheck-reference.f32"))
    args = parser.parse_args()
    started = time.perf_counter()
    before = json.loads(args.result.read_text())
    uniform: dict[str, Path] = {}
    for path in sorted(args.run.glob("variant-*.gguf")):
        types = set(peers.block_linear(path)[2])
        if len(types) == 1 and next(iter(types)) in LEGACY:
            uniform[next(iter(types))] = path
    jobs = {"latency_job": args.run / "job-latency" / "model.gguf", "latency_and_size_job":
            args.run / "job-both" / "model.gguf"}
    files = {**jobs, **{f"uniform {t}": p for t, p in sorted(uniform.items())}}
    if args.no_timing:
        second = before["uniform_decode_ms_second_session"]
        timed = {"latency_job": {"decode_ms": before["latency_job"]["measured_ms"]},
                 "latency_and_size_job": {"decode_ms": before["latency_and_size_job"]["measured_ms"]},
                 **{f"uniform {t}": {"decode_ms": second[t]} for t in uniform}}
    else:
        timed = dict(zip(files, time_files(list(files.values()), rounds=args.rounds), strict=True))
    sys.stderr.write(json.dumps({"timed": timed}) + "\n")
    base = load_model(before["model"])
    ids = tokenize_for_perplexity(base.tokenizer, read_text(args.text))
    del base
    windows = [ids[i * 512:(i + 1) * 512] for i in range(args.windows)]
    reference = None
    for index, row in enumerate(llama_cpp_rows(Path(resolve_reference(before["model"])[1]), windows)):
        if reference is None:
            reference = np.lib.format.open_memmap(args.scratch, mode="w+", dtype=np.float32,
                                                  shape=(len(windows), *row.shape))
        reference[index] = row.numpy()
    assert reference is not None
    rows = {}
    for name, path in files.items():
        rows[name] = {**timed[name], **stream_score(path, windows, reference)}
        sys.stderr.write(json.dumps({name: rows[name]}) + "\n")
    args.scratch.unlink()
    budget = float(before["latency_budget_ms"])
    ours = rows["latency_job"]
    as_fast = {name: row for name, row in rows.items() if name.startswith("uniform") and
               row["decode_ms"] <= ours["decode_ms"]}
    report = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "latency-recheck", "model": before["model"], "machine": fingerprint(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "rounds": None if args.no_timing else args.rounds,
        "windows": args.windows, "evaluator": "llama.cpp",
        "latency_budget_ms": budget, "files": rows,
        "latency_job_within_budget_or_5pct": ours["decode_ms"] <= 1.05 * budget,
        "uniform_at_least_as_fast": sorted(as_fast),
        "kl_lower_than_every_uniform_at_least_as_fast": all(ours["kl_mean"] < r["kl_mean"] for r in as_fast.values()),
        "total_s": round(time.perf_counter() - started, 1)}
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
