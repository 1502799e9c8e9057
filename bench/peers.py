"""llama.cpp's presets against ours at exactly their sizes, on the same source file, scored by the same code.

For each preset (Q2_K ... Q6_K) the bundled SmolLM2 GGUF is quantized by llama.cpp's own ``llama_model_quantize``
(llama-cpp-python; the token embedding kept Q8_0 as in the source, requantizing allowed since the source is
Q4_1). Its block-linear bytes (the 210 attention and MLP weights) are read from the written file. Ours: one
bitplan job with one budget per preset at exactly those bytes (``--formats``, default ``gguf-k``: llama.cpp's
K-quants and legacy types encoded by llama.cpp's own quantizer with our importance vectors), each artifact
exported to GGUF. Every file, theirs and ours, is then loaded the same way (transformers' GGUF loader) and
scored on WikiText-2 windows the calibration never saw: mean per-token KL to the source model's logits and
perplexity. A second peer per preset keeps the preset's own per-tensor types but encodes them with our
importance vectors (what ``llama-quantize --imatrix`` does). Prints one JSON object; ``ratio_kl`` is ours /
theirs, ``ratio_kl_vs_importance_peer`` ours / theirs-with-importance.

    python bench/peers.py [--presets Q2_K,Q3_K_M] [--windows 32] [--formats gguf-k] [--out runs/peers]
    python bench/peers.py --target gguf   # every file run by llama.cpp itself; ours also at the whole-file bytes
    python bench/peers.py --model gemma-3-270m --target gguf --block-bytes-only   # llama.cpp-scored, block bytes
    python bench/peers.py ... --no-importance-peer   # without the second peer: a third fewer evaluations
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import gguf
import numpy
import torch

from bitplan.calibration import read_text
from bitplan.evaluation import tokenize_for_perplexity
from bitplan.exports.common import export_artifact
from bitplan.models import load_model, resolve_reference
from bitplan.pipeline import run_budgets
from bitplan.sensitivity.kl import per_token_kl
from bitplan.spec import JobSpec

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q6_K")
BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
Q8_0 = 8  # GGML type id, the source's token embedding type


def make_preset(source: Path, out: Path, preset: str) -> float:
    """``out`` = llama.cpp's ``preset`` of ``source``; returns the seconds it took."""
    import llama_cpp

    started = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.allow_requantize = True
    params.token_embedding_type = Q8_0
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({preset}) returned {status}")
    return round(time.perf_counter() - started, 1)


def preset_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name of every block-linear tensor of a file."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if BLOCK_LINEAR.search(t.name)}


def with_our_importance(model_ref: str, presets: list[str], out: Path, samples: int, seq_len: int) -> dict[str, Path]:
    """Each preset's own per-tensor types, encoded by llama.cpp's ``ggml_quantize_chunk`` with our importance
    vectors (what ``llama-quantize --imatrix`` does with an importance matrix: same types, weighted rounding;
    llama-cpp-python's ``llama_model_quantize`` takes its imatrix only as a C++ map). Written as GGUF files."""
    from bitplan.artifact import write_artifact
    from bitplan.calibration import build_calibration_set
    from bitplan.manifest import RunRecord, SensitivityRecord, SolverRecord, SourceRecord
    from bitplan.quantize import encode_unit
    from bitplan.sensitivity.importance import input_energy
    from bitplan.units import find_units

    loaded = load_model(model_ref)
    units = find_units(loaded.model)
    calib = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=samples, seq_len=seq_len)
    importance = input_energy(loaded.model, units, list(torch.split(calib.tokens, 1)))
    reader = gguf.GGUFReader(resolve_reference(model_ref)[1])
    arch = str(reader.fields["general.architecture"].contents())
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.TensorNameMap(arch_id, int(reader.fields[f"{arch}.block_count"].contents()))
    gguf_name = {unit: names.get_name(f"{unit}.weight", try_suffixes=(".weight",)) for unit in units}
    spec = JobSpec.from_flat(model=model_ref, bits_per_weight=5.0, formats="gguf-all")
    paths = {}
    for preset in presets:
        types = preset_types(out / f"llama-{preset}.gguf")
        quantized = {unit: encode_unit(spec, units[unit].weight, types[gguf_name[unit]], importance, unit)
                     for unit in units}
        record = RunRecord(source=SourceRecord(reference=model_ref, format="gguf", sha256=loaded.source_sha256),
                           budget={"preset": preset}, group_size=32, candidate_bits=[],
                           solver=SolverRecord(name=None, status="uniform", objective=None, lower_bound=None,
                                               solve_s=None),
                           sensitivity=SensitivityRecord(metric=None, warnings=[]), calibration=None,
                           quantizer=f"llama.cpp {preset} types + our importance", mix_groups=False)
        folder = out / f"imatrix-{preset}"
        write_artifact(folder, model=loaded.model, tokenizer=loaded.tokenizer, kind=loaded.kind, quantized=quantized,
                       run=record, float_dtype=torch.float16)
        paths[preset] = out / f"imatrix-{preset}.gguf"
        export_artifact(folder, format="gguf", out=paths[preset])
    return paths


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
    """Mean per-token KL(reference || logprobs), its 99th percentile, and perplexity of ``logprobs_of`` (consumed
    one window at a time)."""
    kls, nll, tokens = [], 0.0, 0
    for window, ref, logprobs in zip(windows, reference, logprobs_of, strict=True):
        kls.append(per_token_kl(ref, logprobs))
        nll += float(-logprobs[:-1].gather(1, window[1:, None]).sum())
        tokens += window.numel() - 1
    every = torch.cat(kls)
    return {"kl_mean": float(every.mean()), "kl_p99": float(torch.quantile(every.double(), 0.99)),
            "ppl": math.exp(nll / tokens)}


def ratio(ours: float, theirs: float) -> float:
    """``ours / theirs``; a preset that is the source itself (gemma-3-270m's file is Q4_K_M) has KL 0: the ratio is
    1 when ours is exact too, infinite otherwise."""
    if theirs == 0.0:
        return 1.0 if ours == 0.0 else math.inf
    return ours / theirs


def whole_file(args: argparse.Namespace, preset: str, file_bytes: int, windows: list[torch.Tensor],
               reference: list[torch.Tensor], evaluator: str) -> dict[str, object]:
    """Ours at the preset's whole-file bytes: a ``--target gguf --file-bytes`` job (its sensitivity from the
    cache), its ``model.gguf`` scored like the others."""
    from bitplan.pipeline import run_pipeline

    spec = JobSpec.from_flat(model=args.model, file_bytes=file_bytes, target="gguf", formats=args.formats,
                             num_samples=args.samples, quantizer=args.quantizer, metric=args.metric, kl_windows=0,
                             quality_windows=0)
    run = run_pipeline(spec, out=args.out / f"ours-file-{preset}")
    path = Path(run.artifact) / "model.gguf"
    size, numel, types = block_linear(path)
    return {"budget_file_bytes": file_bytes, "within_budget": path.stat().st_size <= file_bytes,
            "block_linear_bytes": size, "bits_per_weight": 8 * size / numel, "types": types,
            "head": run.head, **score(path, windows, reference, evaluator)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--formats", default="gguf-k")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--quantizer", default="rtn")
    parser.add_argument("--metric", default="auto", help="our jobs' sensitivity metric (auto: the default)")
    parser.add_argument("--out", type=Path, default=Path("runs/peers"))
    parser.add_argument("--target", choices=("bitplan", "gguf"), default="bitplan",
                        help="gguf: every file run and scored by llama.cpp itself (llama-cpp-python), and ours also "
                             "at each preset's whole-file bytes (a --target gguf --file-bytes job)")
    parser.add_argument("--block-bytes-only", action="store_true",
                        help="with --target gguf, skip ours at each preset's whole-file bytes (one job per preset)")
    parser.add_argument("--no-importance-peer", action="store_true",
                        help="skip the second peer (each preset's types encoded with our importance vectors): a third "
                             "fewer evaluations, for a model whose evaluation is slow (gemma-3-270m's 262k vocabulary)")
    args = parser.parse_args()
    evaluator = "llama.cpp" if args.target == "gguf" else "torch"
    presets = args.presets.split(",")
    _, source = resolve_reference(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "peers", "model": args.model, "source": str(source), "text": str(args.text),
        "windows": args.windows, "seq_len": args.seq_len, "formats": args.formats, "quantizer": args.quantizer,
        "metric": args.metric,
        "evaluator": evaluator,
        "calibration": f"built-in text, {args.samples} x {args.seq_len} tokens",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    loaded = load_model(args.model)
    ids = tokenize_for_perplexity(loaded.tokenizer, read_text(args.text))
    windows = [ids[i * args.seq_len:(i + 1) * args.seq_len] for i in range(args.windows)]
    del loaded
    gc.collect()
    # the source as the same runtime computes it (torch: the model reference as our loader reads it)
    reference = reference_logprobs(args.model if evaluator == "torch" else source, windows, evaluator,
                                   args.out / "reference-logprobs.npy")
    report["source_scores"] = score_logprobs(windows, reference, reference)  # the reference is the source's own run
    report["source_scores"]["file_bytes"] = source.stat().st_size
    theirs = {}
    for preset in presets:
        path = args.out / f"llama-{preset}.gguf"
        seconds = make_preset(source, path, preset)
        size, numel, types = block_linear(path)
        theirs[preset] = {"block_linear_bytes": size, "bits_per_weight": 8 * size / numel, "types": types,
                          "quantize_s": seconds, "file_bytes": path.stat().st_size}
    imatrix_peers = ({} if args.no_importance_peer else
                     with_our_importance(args.model, presets, args.out, args.samples, args.seq_len))
    numel = block_linear(source)[1]
    budgets = [8 * theirs[p]["block_linear_bytes"] / numel for p in presets]
    spec = JobSpec.from_flat(model=args.model, bits_per_weight=budgets, formats=args.formats,
                             num_samples=args.samples, quantizer=args.quantizer, metric=args.metric)
    job_started = time.perf_counter()
    runs = run_budgets(spec, out_dirs=[args.out / f"ours-{p}" for p in presets])
    report["job_s"] = round(time.perf_counter() - job_started, 1)
    report["job_timings_s"] = runs[0].timings_s
    rows = []
    for preset, run in zip(presets, runs, strict=True):
        gguf_path = args.out / f"ours-{preset}.gguf"
        export_artifact(Path(run.artifact), format="gguf", out=gguf_path)
        size, _, types = block_linear(gguf_path)
        ours = {"block_linear_bytes": size, "bits_per_weight": 8 * size / numel, "types": types,
                "job_kl_check": run.kl_divergence, **score(gguf_path, windows, reference, evaluator)}
        peer = {**theirs[preset], **score(args.out / f"llama-{preset}.gguf", windows, reference, evaluator)}
        row = {"preset": preset, "theirs": peer, "ours": ours,
               "ours_within_their_bytes": size <= peer["block_linear_bytes"],
               "ratio_kl": ratio(ours["kl_mean"], peer["kl_mean"]), "ratio_ppl": ours["ppl"] / peer["ppl"]}
        if preset in imatrix_peers:
            imatrix = {"block_linear_bytes": block_linear(imatrix_peers[preset])[0],
                       **score(imatrix_peers[preset], windows, reference, evaluator)}
            row["theirs_with_our_importance"] = imatrix
            row["ratio_kl_vs_importance_peer"] = ratio(ours["kl_mean"], imatrix["kl_mean"])
        if args.target == "gguf" and not args.block_bytes_only:
            row["ours_at_file_bytes"] = whole_file(args, preset, peer["file_bytes"], windows, reference, evaluator)
            row["ratio_kl_at_file_bytes"] = ratio(row["ours_at_file_bytes"]["kl_mean"], peer["kl_mean"])
        rows.append(row)
        (args.out / "rows-so-far.json").write_text(json.dumps({**report, "rows": rows}))  # survives a stopped run
        sys.stderr.write(json.dumps({"preset": preset, "ratio_kl": rows[-1]["ratio_kl"], "ours_kl": ours["kl_mean"],
                                     "theirs_kl": peer["kl_mean"]}) + "\n")
    report["rows"] = rows
    report["lower_kl_than_every_preset"] = all(r["ratio_kl"] < 1 for r in rows)
    # a preset in the source's own type is the source (KL 0): nothing is lower, ours can only equal it
    report["presets_equal_to_the_source"] = [r["preset"] for r in rows if r["theirs"]["kl_mean"] == 0.0]
    report["lower_kl_than_every_preset_or_both_exact"] = all(  # against an exact preset ratio() is 1 iff ours is exact
        r["ratio_kl"] < 1 if r["theirs"]["kl_mean"] else r["ratio_kl"] == 1 for r in rows)
    if args.target == "gguf" and not args.block_bytes_only:
        report["lower_kl_than_every_preset_at_file_bytes"] = all(r["ratio_kl_at_file_bytes"] < 1 for r in rows)
        report["mean_ratio_kl_at_file_bytes"] = sum(r["ratio_kl_at_file_bytes"] for r in rows) / len(rows)
    if imatrix_peers:
        report["lower_kl_than_every_preset_with_our_importance"] = all(
            r["ratio_kl_vs_importance_peer"] < 1 for r in rows)
    report["median_ratio_kl"] = sorted(r["ratio_kl"] for r in rows)[len(rows) // 2]
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
