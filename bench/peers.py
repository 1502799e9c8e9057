"""llama.cpp's presets against ours at exactly their sizes, on the same source file, scored by the same code.

For each preset (Q2_K ... Q6_K) the bundled SmolLM2 GGUF is quantized by llama.cpp's own ``llama_model_quantize``
(llama-cpp-python; the token embedding kept Q8_0 as in the source, requantizing allowed since the source is
Q4_1). Its block-linear bytes (the 210 attention and MLP weights) are read from the written file. Ours: one
bitplan job with one budget per preset at exactly those bytes (``--formats``, default ``gguf-k``: llama.cpp's
K-quants and legacy types encoded by llama.cpp's own quantizer with our importance vectors), each artifact
exported to GGUF. Every file, theirs and ours, is then loaded the same way (transformers' GGUF loader) and
scored on WikiText-2 windows the calibration never saw: per-token KL to the source model's logits (mean, p99,
p99.9), perplexity and top-1 agreement. A second peer per preset keeps the preset's own per-tensor types but encodes
them with our importance vectors (what ``llama-quantize --imatrix`` does). Prints one JSON object; ``ratio_kl`` is
ours / theirs, ``ratio_kl_vs_importance_peer`` ours / theirs-with-importance, ``ratio_kl_at_file_bytes*`` the same
for ours at the preset's whole-file bytes (a ``bitplan run`` in a process of its own, its time and peak memory
recorded). From a float source (``bench/float_source.py``'s rotated F16 GGUF) every preset is made as
``llama-quantize`` makes it, the token embedding included.

    python bench/peers.py [--presets Q2_K,Q3_K_M] [--windows 32] [--formats gguf-k] [--out runs/peers]
    python bench/peers.py --target gguf   # every file run by llama.cpp itself; ours also at the whole-file bytes
    python bench/peers.py --model gemma-3-270m --target gguf --block-bytes-only   # llama.cpp-scored, block bytes
    python bench/peers.py ... --no-importance-peer   # without the second peer: a third fewer evaluations
    python bench/peers.py --model runs/float/qwen-rotated-f16.gguf --target gguf --file-bytes-only --windows 16 \
        --presets Q2_K,Q3_K_M,Q4_K_M   # a float source: the preset, the preset with importance, ours at file bytes
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import gguf
import numpy
import torch

from bitplan.job.pipeline import run_budgets
from bitplan.report.evaluation import tokenize_for_perplexity
from bitplan.sensitivity.kl import per_token_kl
from bitplan.sources.calibration import read_text
from bitplan.sources.models import load_model, resolve_reference
from bitplan.spec import JobSpec
from bitplan.targets.exports.common import export_artifact

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q6_K")
_importance_peer = _own_folder_off_path.sibling("_importance_peer")
BLOCK_LINEAR, with_our_importance = _importance_peer.BLOCK_LINEAR, _importance_peer.with_our_importance
Evaluation = tuple[list[torch.Tensor], list[torch.Tensor], str]  # windows, the source's log-probabilities, evaluator
Q8_0 = 8  # GGML type id, the source's token embedding type
FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def make_preset(source: Path, out: Path, preset: str) -> float:
    """``out`` = llama.cpp's ``preset`` of ``source``; returns the seconds it took. From a quantized source the
    token embedding stays Q8_0 (as in the bundled SmolLM2, whose embedding is Q8_0); from a float source (F16, F32,
    BF16: ``bench/float_source.py``'s) every tensor gets the type the preset gives it, as ``llama-quantize`` does."""
    import llama_cpp

    started = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.allow_requantize = True
    embedding = {t.name: t.tensor_type for t in gguf.GGUFReader(source).tensors}["token_embd.weight"]
    if embedding not in FLOAT_TYPES:
        params.token_embedding_type = Q8_0
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({preset}) returned {status}")
    return round(time.perf_counter() - started, 1)


def block_linear(path: Path) -> tuple[int, int, dict[str, int]]:
    """Bytes and weights of the block-linear tensors of a GGUF file, and how many tensors of each type."""
    reader = gguf.GGUFReader(path)
    total, numel, types = 0, 0, {}
    for tensor in reader.tensors:
        if BLOCK_LINEAR.search(tensor.name):
            total += int(tensor.n_bytes)
            numel += int(tensor.n_elements)
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return total, numel, types


@torch.no_grad()
def torch_logprobs(path: Path | str, windows: list[torch.Tensor], reported: dict[str, float]) -> Iterator[torch.Tensor]:
    """Each window's next-token log-probabilities, the file loaded by transformers and run by torch, one window at
    a time (a 262k-token vocabulary makes 32 windows' log-probabilities 17 GB)."""
    model = load_model(str(path)).model
    for window in windows:
        yield torch.log_softmax(model(window[None]).logits[0].float(), dim=-1)
    del model
    gc.collect()


def llama_cpp_logprobs(path: Path, windows: list[torch.Tensor], reported: dict[str, float]) -> Iterator[torch.Tensor]:
    """Each window's next-token log-probabilities as llama.cpp computes them (llama-cpp-python, this machine's
    threads), one window at a time; puts the model's size as llama.cpp reports it (``llama_model_size``: its "file
    size" line) in ``reported``."""
    import llama_cpp

    from bitplan.report.llama_runtime import plain_cpu_buffers

    plain_cpu_buffers()  # llama-cpp-python 0.3.36 built here segfaults with its extra (repacked) CPU buffers
    runtime = llama_cpp.Llama(model_path=str(path), n_ctx=len(windows[0]), n_batch=len(windows[0]),
                              logits_all=True, n_threads=os.cpu_count(), verbose=False)
    size = int(llama_cpp.llama_model_size(runtime.model))
    reported.update({"llama_cpp_model_bytes": size,
                     "llama_cpp_bpw": 8 * size / int(llama_cpp.llama_model_n_params(runtime.model))})
    for window in windows:
        runtime.reset()
        runtime.eval(window.tolist())
        yield torch.log_softmax(torch.from_numpy(runtime.scores[: len(window)]).float(), dim=-1)
    runtime.close()


EVALUATORS = {"torch": torch_logprobs, "llama.cpp": llama_cpp_logprobs}


def reference_logprobs(path: Path | str, windows: list[torch.Tensor], evaluator: str,
                       store: Path) -> list[torch.Tensor]:
    """The source's log-probabilities on every window, written to ``store`` (float32, memory-mapped) and read back
    as one tensor per window, so that only the page cache, not this process, holds them."""
    reported: dict[str, float] = {}
    array = None
    for index, logprobs in enumerate(EVALUATORS[evaluator](path, windows, reported)):
        if array is None:
            array = numpy.lib.format.open_memmap(store, mode="w+", dtype=numpy.float32,
                                                 shape=(len(windows), *logprobs.shape))
        array[index] = logprobs.numpy()
    array.flush()
    del array
    readback = numpy.load(store, mmap_mode="c")  # copy-on-write: writable views, no copy
    return [torch.from_numpy(readback[i]) for i in range(len(windows))]


def score(path: Path, windows: list[torch.Tensor], reference: list[torch.Tensor],
          evaluator: str = "torch") -> dict[str, float]:
    """Mean per-token KL(source || model), its 99th percentile, and perplexity, on ``windows``: the file loaded by
    transformers and run by torch, or (``evaluator="llama.cpp"``) run by llama.cpp itself."""
    started = time.perf_counter()
    extra: dict[str, float] = {}
    scores = score_logprobs(windows, reference, EVALUATORS[evaluator](path, windows, extra))
    return {**scores, "eval_s": round(time.perf_counter() - started, 1), "file_bytes": path.stat().st_size, **extra}


@torch.no_grad()
def score_logprobs(windows: list[torch.Tensor], reference: list[torch.Tensor],
                   logprobs_of: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean per-token KL(reference || logprobs), its 99th and 99.9th percentiles (Unsloth ranks GGUF files by the
    latter), perplexity, and top-1 agreement (the share of positions where both predict the same next token) of
    ``logprobs_of`` (consumed one window at a time)."""
    kls, agree, nll, tokens = [], [], 0.0, 0
    for window, ref, logprobs in zip(windows, reference, logprobs_of, strict=True):
        kls.append(per_token_kl(ref, logprobs))
        agree.append(ref.argmax(dim=-1) == logprobs.argmax(dim=-1))
        nll += float(-logprobs[:-1].gather(1, window[1:, None]).sum())
        tokens += window.numel() - 1
    every = torch.cat(kls).double()
    return {"kl_mean": float(every.mean()), "kl_p99": float(torch.quantile(every, 0.99)),
            "kl_p999": float(torch.quantile(every, 0.999)), "ppl": math.exp(nll / tokens),
            "top1_agreement": float(torch.cat(agree).double().mean())}


def ratio(ours: float, theirs: float) -> float:
    """``ours / theirs``; a preset that is the source itself (gemma-3-270m's file is Q4_K_M) has KL 0: the ratio is
    1 when ours is exact too, infinite otherwise."""
    if theirs == 0.0:
        return 1.0 if ours == 0.0 else math.inf
    return ours / theirs


def run_measured(command: list[str]) -> tuple[str, int, float]:
    """Run ``command``; its stdout, the peak resident memory of its process tree in bytes (sampled every 0.2 s with
    psutil, as ``bench/scale.py`` measures a job) and its wall seconds. Raises ``RuntimeError`` if it fails."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]))
        time.sleep(0.2)
    output, errors = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}: {errors[-2000:]}")
    return output, peak, round(time.perf_counter() - started, 1)


def whole_file(args: argparse.Namespace, preset: str, file_bytes: int, windows: list[torch.Tensor],
               reference: list[torch.Tensor], evaluator: str) -> dict[str, object]:
    """Ours at the preset's whole-file bytes: ``bitplan run --target gguf --file-bytes`` in a process of its own, as
    a user runs it (its sensitivity from the cache after the first preset), with its seconds per stage and the
    peak memory of its process tree; its ``model.gguf`` scored like the others."""
    out = args.out / f"ours-file-{preset}"
    command = [sys.executable, "-m", "bitplan.service.cli", "run", "--model", str(args.model), "--file-bytes",
               str(file_bytes), "--target", "gguf", "--formats", args.formats, "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--quantizer", args.quantizer, "--metric", args.metric,
               "--kl-windows", "0", "--quality-windows", "0", "--out", str(out), "--json", "--quiet"]
    output, peak, wall = run_measured(command)
    run = json.loads(output.strip().splitlines()[-1])
    path = Path(run["artifact"]) / "model.gguf"
    size, numel, types = block_linear(path)
    job = {"wall_s": wall, "timings_s": run["timings_s"], "peak_rss_bytes": peak,
           "peak_rss_gib": round(peak / (1 << 30), 2), "command": " ".join(command)}
    return {"budget_file_bytes": file_bytes, "within_budget": path.stat().st_size <= file_bytes,
            "block_linear_bytes": size, "bits_per_weight": 8 * size / numel, "types": types,
            "head": run["head"], "job": job, **score(path, windows, reference, evaluator)}


def source_tokenizer(model: str) -> object:
    """The model's tokenizer as bitplan's loader makes it; for a GGUF without loading its weights (a 1.5B model's
    are 7 GB in float32)."""
    kind, path = resolve_reference(model)
    if kind != "gguf":
        return load_model(model).tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # as bitplan.sources.models._load_gguf


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--formats", default="gguf-k")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation and calibration window")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--quantizer", default="rtn")
    parser.add_argument("--metric", default="auto", help="our jobs' sensitivity metric (auto: the default)")
    parser.add_argument("--out", type=Path, default=Path("runs/peers"))
    parser.add_argument("--target", choices=("bitplan", "gguf"), default="bitplan",
                        help="gguf: every file run and scored by llama.cpp itself (llama-cpp-python), and ours also "
                             "at each preset's whole-file bytes (a --target gguf --file-bytes job)")
    parser.add_argument("--block-bytes-only", action="store_true",
                        help="with --target gguf, skip ours at each preset's whole-file bytes (one job per preset)")
    parser.add_argument("--file-bytes-only", action="store_true",
                        help="with --target gguf, skip ours at each preset's block-linear bytes (the sweep job): only "
                             "the whole-file comparison, for a model whose jobs are slow (the 1.5B Qwen)")
    parser.add_argument("--reuse-presets", action="store_true",
                        help="keep a preset file an earlier run wrote in --out after the source was last written "
                             "(llama.cpp's presets are deterministic; a 1.5B model's take minutes each here)")
    parser.add_argument("--no-importance-peer", action="store_true",
                        help="skip the second peer (each preset's types encoded with our importance vectors): a third "
                             "fewer evaluations, for a model whose evaluation is slow (gemma-3-270m's 262k vocabulary)")
    args = parser.parse_args()
    if (args.block_bytes_only or args.file_bytes_only) and args.target != "gguf":
        parser.error("--block-bytes-only and --file-bytes-only need --target gguf")
    if args.block_bytes_only and args.file_bytes_only:
        parser.error("--block-bytes-only and --file-bytes-only leave nothing of ours to compare: give one")
    return args


def block_rows(args: argparse.Namespace, presets: list[str], theirs: dict[str, dict[str, object]],
               report: dict[str, object]) -> dict[str, dict[str, object]]:
    """Ours at each preset's block-linear bytes (one sweep job, exported to GGUF): preset -> the file's bytes, bits
    and types, unscored; {} with ``--file-bytes-only``."""
    if args.file_bytes_only:
        return {}
    numel = block_linear(resolve_reference(args.model)[1])[1]
    budgets = [8 * theirs[p]["block_linear_bytes"] / numel for p in presets]
    spec = JobSpec.from_flat(model=args.model, bits_per_weight=budgets, formats=args.formats,
                             num_samples=args.samples, quantizer=args.quantizer, metric=args.metric)
    job_started = time.perf_counter()
    runs = run_budgets(spec, out_dirs=[args.out / f"ours-{p}" for p in presets])
    report["job_s"] = round(time.perf_counter() - job_started, 1)
    report["job_timings_s"] = runs[0].timings_s
    ours = {}
    for preset, run in zip(presets, runs, strict=True):
        gguf_path = args.out / f"ours-{preset}.gguf"
        export_artifact(Path(run.artifact), format="gguf", out=gguf_path)
        size, _, types = block_linear(gguf_path)
        ours[preset] = {"path": gguf_path, "block_linear_bytes": size, "bits_per_weight": 8 * size / numel,
                        "types": types, "job_kl_check": run.kl_divergence}
    return ours


def compare_preset(args: argparse.Namespace, preset: str, evaluated: Evaluation, theirs: dict[str, object],
                   ours: dict[str, object] | None, imatrix_path: Path | None) -> dict[str, object]:
    """One preset's row: every file scored, and ours over theirs (``ratio_*``)."""
    windows, reference, evaluator = evaluated
    peer = {**theirs, **score(args.out / f"llama-{preset}.gguf", windows, reference, evaluator)}
    row: dict[str, object] = {"preset": preset, "theirs": peer}
    if ours is not None:
        ours = {**{k: v for k, v in ours.items() if k != "path"}, **score(ours["path"], windows, reference, evaluator)}
        row.update(ours=ours, ours_within_their_bytes=ours["block_linear_bytes"] <= peer["block_linear_bytes"],
                   ratio_kl=ratio(ours["kl_mean"], peer["kl_mean"]), ratio_ppl=ours["ppl"] / peer["ppl"])
    if imatrix_path is not None:
        imatrix = {"block_linear_bytes": block_linear(imatrix_path)[0], **score(imatrix_path, *evaluated)}
        row["theirs_with_our_importance"] = imatrix
        if ours is not None:
            row["ratio_kl_vs_importance_peer"] = ratio(ours["kl_mean"], imatrix["kl_mean"])
    if args.target == "gguf" and not args.block_bytes_only:
        try:
            at_file = whole_file(args, preset, peer["file_bytes"], windows, reference, evaluator)
        except RuntimeError as error:  # the job failed: keep the peers' scores of this row, say why ours is missing
            row["ours_at_file_bytes"] = {"error": str(error)}
            return row
        row["ours_at_file_bytes"] = at_file
        row["ratio_kl_at_file_bytes"] = ratio(at_file["kl_mean"], peer["kl_mean"])
        if imatrix_path is not None:
            row["ratio_kl_at_file_bytes_vs_importance_peer"] = ratio(at_file["kl_mean"], imatrix["kl_mean"])
    return row


def summarize(report: dict[str, object], rows: list[dict[str, object]]) -> None:
    """The verdicts over every row that has the ratio they need."""
    def verdict(key: str) -> list[float]:
        return [r[key] for r in rows if key in r]

    if verdict("ratio_kl"):
        report["lower_kl_than_every_preset"] = all(r < 1 for r in verdict("ratio_kl"))
        # a preset in the source's own type is the source (KL 0): nothing is lower, ours can only equal it
        report["presets_equal_to_the_source"] = [r["preset"] for r in rows if r["theirs"]["kl_mean"] == 0.0]
        report["lower_kl_than_every_preset_or_both_exact"] = all(  # against an exact preset: 1 iff ours is exact
            r["ratio_kl"] < 1 if r["theirs"]["kl_mean"] else r["ratio_kl"] == 1 for r in rows)
        report["median_ratio_kl"] = sorted(verdict("ratio_kl"))[len(rows) // 2]
    if verdict("ratio_kl_vs_importance_peer"):
        report["lower_kl_than_every_preset_with_our_importance"] = all(
            r < 1 for r in verdict("ratio_kl_vs_importance_peer"))
    if verdict("ratio_kl_at_file_bytes"):
        report["lower_kl_than_every_preset_at_file_bytes"] = all(r < 1 for r in verdict("ratio_kl_at_file_bytes"))
        report["mean_ratio_kl_at_file_bytes"] = sum(verdict("ratio_kl_at_file_bytes")) / len(rows)
    at_file_vs_importance = verdict("ratio_kl_at_file_bytes_vs_importance_peer")
    if at_file_vs_importance:
        report["max_ratio_kl_at_file_bytes_vs_importance_peer"] = max(at_file_vs_importance)


def main() -> None:
    args = parse_args()
    evaluator = "llama.cpp" if args.target == "gguf" else "torch"
    presets = args.presets.split(",")
    _, source = resolve_reference(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "peers", "model": args.model, "source": str(source), "text": str(args.text),
        "windows": args.windows, "seq_len": args.seq_len, "formats": args.formats, "quantizer": args.quantizer,
        "metric": args.metric, "evaluator": evaluator,
        "calibration": f"built-in text, {args.samples} x {args.seq_len} tokens",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    ids = tokenize_for_perplexity(source_tokenizer(args.model), read_text(args.text))
    windows = [ids[i * args.seq_len:(i + 1) * args.seq_len] for i in range(args.windows)]
    # the source as the same runtime computes it (torch: the model reference as our loader reads it)
    reference = reference_logprobs(args.model if evaluator == "torch" else source, windows, evaluator,
                                   args.out / "reference-logprobs.npy")
    report["source_scores"] = score_logprobs(windows, reference, reference)  # the reference is the source's own run
    report["source_scores"]["file_bytes"] = source.stat().st_size
    theirs = {}
    for preset in presets:
        path = args.out / f"llama-{preset}.gguf"
        reuse = args.reuse_presets and path.is_file() and path.stat().st_mtime > source.stat().st_mtime
        seconds = None if reuse else make_preset(source, path, preset)  # None: made by an earlier run from source
        size, numel, types = block_linear(path)
        theirs[preset] = {"block_linear_bytes": size, "bits_per_weight": 8 * size / numel, "types": types,
                          "quantize_s": seconds, "file_bytes": path.stat().st_size}
    imatrix_peers = ({} if args.no_importance_peer else
                     with_our_importance(args.model, presets, args.out, args.samples, args.seq_len))
    ours = block_rows(args, presets, theirs, report)
    rows = []
    for preset in presets:
        rows.append(compare_preset(args, preset, (windows, reference, evaluator), theirs[preset], ours.get(preset),
                                   imatrix_peers.get(preset)))
        (args.out / "rows-so-far.json").write_text(json.dumps({**report, "rows": rows}))  # survives a stopped run
        sys.stderr.write(json.dumps({k: v for k, v in rows[-1].items() if k.startswith("ratio")}) + "\n")
    report["rows"] = rows
    summarize(report, rows)
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
