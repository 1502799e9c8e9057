"""A Hugging Face folder as the source of a ``--target gguf`` job, on a real model: the bundled GGUF (default
gemma-3-270m) saved by transformers as a folder (config, safetensors, tokenizer.json: what a user downloads from a
hub), one job from that folder and one from the GGUF itself at the same budget, and llama.cpp's own preset at
that size. Every file is run by llama.cpp (llama-cpp-python): mean per-token KL to the source GGUF's logits and
perplexity on WikiText-2 windows, the tokenization of the text compared with transformers', the file's bytes
against the job's prediction and budget, and a greedy completion. Prints one JSON object.

    python bench/hf_folder_source.py [--model gemma-3-270m] [--preset Q3_K_M] [--windows 4] [--out runs/hf-source]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.job.pipeline import run_pipeline
from bitplan.report.evaluation import tokenize_for_perplexity
from bitplan.sources.calibration import read_text
from bitplan.sources.models import load_model, resolve_reference
from bitplan.spec import JobSpec

peers = _own_folder_off_path.sibling("peers")
PROMPT = "The capital of France is"


def as_hf_folder(model_ref: str, folder: Path) -> None:
    """The bundled model as transformers saves it: config, safetensors (fp32), tokenizer files."""
    loaded = load_model(model_ref)
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


def job(model: str, bpw: float, out: Path, samples: int) -> dict[str, object]:
    started = time.perf_counter()
    run = run_pipeline(JobSpec.from_flat(model=model, bits_per_weight=bpw, target="gguf", num_samples=samples,
                                         kl_windows=0, quality_windows=0), out=out)
    path = Path(run.artifact) / "model.gguf"
    size, numel, types = peers.block_linear(path)
    return {"path": str(path), "job_s": round(time.perf_counter() - started, 1), "bytes": run.bytes,
            "bits_per_weight": run.bits_per_weight, "block_linear_bytes_read_back": size,
            "within_budget": run.bits_per_weight <= bpw + 1e-9, "file_bytes": run.file_bytes,
            "file_bytes_measured": path.stat().st_size, "types": types}


def completion(path: Path) -> str:
    from llama_cpp import Llama

    runtime = Llama(model_path=str(path), n_ctx=128, verbose=False)
    text = runtime(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    runtime.close()
    return str(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--text", type=Path, default=peers.DEFAULT_TEXT)
    parser.add_argument("--preset", default="Q3_K_M")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/hf-source"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _, source = resolve_reference(args.model)
    folder = args.out / "hf-folder"
    if not (folder / "config.json").exists():
        as_hf_folder(args.model, folder)
    gc.collect()
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = read_text(args.text)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenize_for_perplexity(tokenizer, text)
    windows = [ids[i * args.seq_len:(i + 1) * args.seq_len] for i in range(args.windows)]
    preset_path = args.out / f"llama-{args.preset}.gguf"
    peers.make_preset(source, preset_path, args.preset)
    preset_bytes, numel, preset_types = peers.block_linear(preset_path)
    bpw = 8 * preset_bytes / numel
    ours_folder = job(str(folder), bpw, args.out / "from-folder", args.samples)
    ours_gguf = job(args.model, bpw, args.out / "from-gguf", args.samples)
    # llama.cpp's tokenizer on our file against transformers' on the folder (the first 4 KB of the text)
    from llama_cpp import Llama

    sample = text[:4096]
    runtime = Llama(model_path=ours_folder["path"], n_ctx=64, vocab_only=True, verbose=False)
    llama_ids = runtime.tokenize(sample.encode(), add_bos=False, special=False)
    hf_ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(sample, add_special_tokens=False).ids
    runtime.close()
    reference = peers.llama_cpp_logprobs(source, windows)[0]
    rows = {}
    for name, path in (("ours_from_hf_folder", Path(ours_folder["path"])),
                       ("ours_from_gguf", Path(ours_gguf["path"])), (f"llama_cpp_{args.preset}", preset_path)):
        rows[name] = {**peers.score(path, windows, reference, "llama.cpp"), "completion": completion(path)}
        gc.collect()
    report = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "hf_folder_source", "model": args.model, "source": str(source), "text": str(args.text),
        "windows": args.windows, "seq_len": args.seq_len, "calibration": f"built-in text, {args.samples} windows",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv), "budget_bits_per_weight": bpw,
        "preset": {"name": args.preset, "block_linear_bytes": preset_bytes, "types": preset_types},
        "tokenization": {"chars": len(sample), "tokens": len(hf_ids), "equal_to_transformers": llama_ids == hf_ids},
        "source_completion": completion(source), "prompt": PROMPT,
        "jobs": {"from_hf_folder": ours_folder, "from_gguf": ours_gguf}, "scores": rows,
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=1))  # noqa: T201 (the benchmark's output)


if __name__ == "__main__":
    main()
