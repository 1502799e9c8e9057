"""Models of the size people quantize, from bf16 folders: random-weight Llama-shaped folders written tensor by
tensor (SmolLM2's tokenizer), each through the default job with ``--target gguf`` (``bitplan run``, which streams a
model over 2 GiB in float32: :mod:`bitplan.job.streamed_job`) in a process of its own, with the peak resident memory
of the whole process tree, seconds per stage and per parameter-token, and the GGUF loaded in llama.cpp and
decoding. Prints one JSON object.

    python bench/scale.py [--shapes 1b,3b,8b] [--windows 8,8,2] [--seq-len 512] [--bpw 4.5] [--folders DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)

SHAPES = {  # Llama-3.x shapes with SmolLM2's 49,152-token vocabulary
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "tie_word_embeddings": True},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "tie_word_embeddings": True},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
}
SHARD_BYTES = 1 << 30


def write_random_folder(folder: Path, shape: str, *, seed: int = 0) -> Path:
    """A random-weight bf16 Llama folder at ``shape``, written one shard at a time (each tensor made, written,
    freed), with SmolLM2's tokenizer; reused when its config is already there."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from bitplan.sources.models import BUNDLED_MODELS

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gguf = BUNDLED_MODELS["smollm2-135m"].path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"], **SHAPES[shape])
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    written = 0

    def flush() -> None:
        nonlocal shard, written
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard = {}
            written = 0

    for name, dims in _tensor_shapes(config):
        if name.endswith("norm.weight"):
            tensor = (1.0 + 0.1 * torch.randn(dims, generator=generator)).to(torch.bfloat16)
        else:
            tensor = (0.02 * torch.randn(dims, generator=generator)).to(torch.bfloat16)
        if written + tensor.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = tensor
        written += tensor.numel() * 2
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer.save_pretrained(folder)
    config.save_pretrained(folder)
    return folder


def _tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:  # noqa: ANN001
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = [("model.embed_tokens.weight", (config.vocab_size, hidden))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes.append(("model.norm.weight", (hidden,)))
    if not config.tie_word_embeddings:
        shapes.append(("lm_head.weight", (config.vocab_size, hidden)))
    return shapes


def run_child(folder: Path, *, windows: int, seq_len: int, bpw: float, out: Path,
              quality_windows: int = 4, formats: str | None = None) -> dict[str, object]:
    """``bitplan run --model FOLDER --bpw B --target gguf`` in a process of its own (the job a user runs, streamed
    for a model this size); its JSON result with the process tree's peak resident memory (sampled every 0.2 s)."""
    import psutil

    command = [sys.executable, "-m", "bitplan.service.cli", "run", "--model", str(folder), "--bpw", str(bpw),
               "--target", "gguf", "--samples", str(windows), "--seq-len", str(seq_len), "--quality-windows",
               str(quality_windows), "--quality-seq-len", str(seq_len), "--out", str(out), "--no-cache", "--json",
               "--quiet", *(["--formats", formats] if formats else [])]
    started = time.perf_counter()
    # the report goes to a file, not a pipe: a MoE job's JSON outgrows a pipe's buffer, and a child blocked writing
    # it while this loop waits for its exit would never end
    report_file = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=report_file, text=True)
    peak = 0
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    report_file.seek(0)
    output = report_file.read()
    if process.returncode != 0:
        raise RuntimeError(f"the job failed ({process.returncode}): {' '.join(command)}")
    job = json.loads(output)
    timings = job["timings_s"]
    parameters = _parameters(folder)
    tokens = windows * seq_len
    total = sum(timings.values())
    types: dict[str, int] = {}
    for unit in job["units"]:
        types[unit["format"]] = types.get(unit["format"], 0) + 1
    return {"parameters": parameters, "tokens": tokens, "windows": windows, "seq_len": seq_len,
            "peak_rss_bytes": peak, "peak_rss_gib": round(peak / (1 << 30), 3),
            "wall_s": round(time.perf_counter() - started, 2), "seconds": timings, "total_s": round(total, 2),
            "seconds_per_parameter_token": total / (parameters * tokens), "status": job["status"],
            "bits_per_weight": job["bits_per_weight"], "file_bytes": job["file_bytes"], "types_chosen": types,
            "units": len(job["units"]), "quality": job["quality"], "warnings": job["warnings"],
            "bytes_by_kind": job.get("bytes_by_kind"), "experts": job.get("experts"),
            "unit_formats": {unit["name"]: unit["format"] for unit in job["units"]}, "gguf": str(out / "model.gguf")}


def _parameters(folder: Path) -> int:
    from bitplan.sources.tensors import SafetensorsStore

    store = SafetensorsStore.of_folder(folder)
    return sum(math.prod(store.shape(n)) for n in store.names())


def llama_cpp_decodes(gguf_path: Path, tokens: int = 8) -> dict[str, object]:
    """Load the GGUF in llama.cpp (llama-cpp-python, as bitplan runs it: :mod:`bitplan.report.llama_runtime`) and
    greedily decode ``tokens`` tokens; what came out."""
    import llama_cpp

    from bitplan.report.llama_runtime import plain_cpu_buffers

    plain_cpu_buffers()
    started = time.perf_counter()
    runtime = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, verbose=False)
    text = runtime("The capital of France is", max_tokens=tokens, temperature=0)["choices"][0]["text"]
    generated = runtime.n_tokens
    runtime.close()
    return {"loaded": True, "tokens_in_context": generated, "text": text,
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,3b,8b")
    parser.add_argument("--windows", default="8,8,2", help="windows per shape, in order")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bpw", type=float, default=4.5)
    parser.add_argument("--folders", type=Path, default=Path("runs/scale"))
    parser.add_argument("--quality-windows", type=int, default=4)
    parser.add_argument("--formats", default=None, help="candidate types (default: the gguf target's ten); fewer "
                        "cut the encoding, which dominates a job's time at these sizes on two cores")
    parser.add_argument("--keep-folders", action="store_true", help="keep the random folders (default: removed)")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    windows = [int(w) for w in args.windows.split(",")]
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(), "benchmark": "scale",
        "command": " ".join(sys.argv), "bits_per_weight": args.bpw, "seq_len": args.seq_len,
        "formats": args.formats or "the gguf target's default",
        "sizes": {},
    }
    for shape, count in zip(shapes, windows, strict=True):
        started = time.perf_counter()
        folder = write_random_folder(args.folders / f"llama-{shape}-bf16", shape)
        written_s = round(time.perf_counter() - started, 1)
        result = run_child(folder, windows=count, seq_len=args.seq_len, bpw=args.bpw,
                           out=args.folders / f"out-{shape}", quality_windows=args.quality_windows,
                           formats=args.formats)
        result["folder_write_s"] = written_s
        result["llama_cpp"] = llama_cpp_decodes(Path(str(result["gguf"])))
        result.pop("unit_formats")
        if not args.keep_folders:
            shutil.rmtree(folder, ignore_errors=True)
        report["sizes"][shape] = result  # type: ignore[index]
        sys.stderr.write(f"{shape}: {json.dumps(result)}\n")
    sizes = report["sizes"]
    if "1b" in sizes and "8b" in sizes:  # type: ignore[operator]
        report["per_parameter_token_8b_over_1b"] = round(
            sizes["8b"]["seconds_per_parameter_token"] / sizes["1b"]["seconds_per_parameter_token"], 3)  # type: ignore[index]
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
