"""Models of the size people quantize, from a lazy bf16 folder: random-weight Llama-shaped folders written tensor
by tensor (SmolLM2's tokenizer), each measured by the streamed half of the default ``--target gguf`` job in a
process of its own, with the peak resident memory of the whole process tree. Prints one JSON object.

    python bench/scale.py [--shapes 1b,3b,8b] [--windows 8,8,2] [--seq-len 512] [--bpw 4.5] [--folders DIR]

What each child runs (``python bench/scale.py --child FOLDER ...``), one block's weights in memory at a time:
1. open the folder lazily (skeleton on meta, shards memory-mapped; nothing read);
2. the calibration windows (built-in text);
3. the input energy of every unit (the encoders' importance), streamed forward;
4. the default metric (token_taylor_kl) over the gguf target's default types, each type's error from its encoder
   with that importance: streamed forward, loss at the head, exact backward block by block;
5. the allocation at ``--bpw``.
Encoding the chosen types, writing the GGUF and the quality report are not streamed yet (issue 41): they are not
in this bench, and its numbers say so (``stages_measured``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
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

    from bitplan.models import BUNDLED_MODELS

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gguf = BUNDLED_MODELS["smollm2-135m"].path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         dtype="bfloat16", **SHAPES[shape])
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


def child(folder: Path, *, windows: int, seq_len: int, bpw: float) -> dict[str, object]:
    """The streamed measuring half of the default gguf job on ``folder`` (the module docstring's steps)."""
    import torch

    from bitplan.calibration import build_calibration_set
    from bitplan.models import ModelKind
    from bitplan.planning import budgets_in_bytes, make_plans, unit_sizes
    from bitplan.sensitivity import Metric, compute_sensitivity
    from bitplan.sensitivity.api import CURVATURE_STRIDE
    from bitplan.sensitivity_pass import format_errors, resolve_metric
    from bitplan.sources import open_lazy
    from bitplan.spec import JobSpec
    from bitplan.stream import Boundaries, DecoderStream, stream_input_energy, streamed_pass
    from bitplan.units import find_units

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 2)
        clock = now

    spec = JobSpec.from_flat(model=str(folder), bits_per_weight=bpw, target="gguf", num_samples=windows,
                             seq_len=seq_len)
    lazy = open_lazy(spec.model)
    units = find_units(lazy.model)
    lap("load")
    calibration = build_calibration_set(lazy.tokenizer, text_file=None, num_samples=windows, seq_len=seq_len,
                                        seed=spec.calibration.seed)
    batches = list(torch.split(calibration.tokens, 1))
    stream = DecoderStream(lazy)
    with Boundaries(1 << 30) as boundaries:
        importance = stream_input_energy(stream, units, batches, boundaries)
    lap("calibration statistics")
    metric = resolve_metric(spec.sensitivity.metric.value, ModelKind.CAUSAL_LM)
    assert metric is Metric.TOKEN_TAYLOR_KL
    options, error_of = format_errors(spec, units, importance)
    from bitplan.models import causal_lm_loss, causal_lm_sampled_loss

    with Boundaries(1 << 30) as boundaries:
        streamed = streamed_pass(lazy, units, loss_fn=causal_lm_loss, curvature_loss_fn=causal_lm_sampled_loss,
                                 boundaries=boundaries)
        sensitivity = compute_sensitivity(lazy.model, units, batches, metric=metric, bits_options=spec.widths,
                                          group_size=spec.quantization.group_size, loss_fn=causal_lm_loss,
                                          curvature_loss_fn=causal_lm_sampled_loss, options=options,
                                          error_of=error_of, max_error_bytes=512 << 20, stream=streamed)
        spilled = boundaries.spilled
    lap("sensitivity")
    sizes = unit_sizes(units, spec.widths, spec.quantization.group_size, spec.quantization.format_names, "gguf")
    numel = sum(m.weight.numel() for m in units.values())
    (plan,) = make_plans(spec, units, sizes, sensitivity, budgets_in_bytes(spec, sizes, numel, None), None)
    lap("allocation")
    chosen: dict[str, int] = {}
    for name in units:
        fmt = (plan.formats or {}).get(name, str(plan.bits[name]))
        chosen[fmt] = chosen.get(fmt, 0) + 1
    parameters = sum(_numel(lazy.store.shape(n)) for n in lazy.store.names())
    del CURVATURE_STRIDE
    return {"parameters": parameters, "block_parameters": numel, "tokens": windows * seq_len,
            "seconds": seconds, "total_s": round(sum(seconds.values()), 2), "status": plan.solver.status,
            "types_chosen": chosen, "boundary_bytes_spilled": spilled, "units": len(units)}


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def run_child(folder: Path, *, windows: int, seq_len: int, bpw: float) -> dict[str, object]:
    """Run :func:`child` in a process of its own; its result with the process tree's peak resident memory."""
    import psutil

    command = [sys.executable, __file__, "--child", str(folder), "--windows", str(windows), "--seq-len",
               str(seq_len), "--bpw", str(bpw)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"the child failed ({process.returncode}): {command}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_bytes"] = peak
    result["peak_rss_gib"] = round(peak / (1 << 30), 3)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    tokens = int(result["tokens"])
    result["seconds_per_parameter_token"] = float(result["total_s"]) / (int(result["parameters"]) * tokens)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,3b,8b")
    parser.add_argument("--windows", default="8,8,2", help="windows per shape, in order")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bpw", type=float, default=4.5)
    parser.add_argument("--folders", type=Path, default=Path("runs/scale"))
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.stdout.write(json.dumps(child(args.child, windows=int(args.windows), seq_len=args.seq_len,
                                          bpw=args.bpw)) + "\n")
        return
    shapes = args.shapes.split(",")
    windows = [int(w) for w in args.windows.split(",")]
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(), "benchmark": "scale",
        "command": " ".join(sys.argv), "bits_per_weight": args.bpw, "seq_len": args.seq_len,
        "stages_measured": "load (lazy), calibration statistics and sensitivity (streamed), allocation; "
                           "encoding, writing and quality are not streamed yet",
        "sizes": {},
    }
    for shape, count in zip(shapes, windows, strict=True):
        started = time.perf_counter()
        folder = write_random_folder(args.folders / f"llama-{shape}-bf16", shape)
        written_s = round(time.perf_counter() - started, 1)
        result = run_child(folder, windows=count, seq_len=args.seq_len, bpw=args.bpw)
        result["windows"] = count
        result["folder_write_s"] = written_s
        report["sizes"][shape] = result  # type: ignore[index]
        sys.stderr.write(f"{shape}: {json.dumps(result)}\n")
    sizes = report["sizes"]
    if "1b" in sizes and "8b" in sizes:  # type: ignore[operator]
        report["per_parameter_token_8b_over_1b"] = round(
            sizes["8b"]["seconds_per_parameter_token"] / sizes["1b"]["seconds_per_parameter_token"], 3)  # type: ignore[index]
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
