"""bfloat16 blocks against float32 in the streamed token pass (issue 41): SmolLM2-135M written as a bf16
safetensors folder (its weights as a bf16 model stores them), streamed once per compute dtype on the same windows
with token_taylor_kl's two losses and RTN errors at the default widths; the time of each pass and how far the
per-unit predicted loss increases move from float32's. Prints one JSON object.

    python bench/stream_dtype.py [--samples 8] [--seq-len 256] [--repeats 2]
    python bench/stream_dtype.py --block-1b [--seq-len 512] [--repeats 3]   # one block of Llama-3.2-1B's shape

Both dtypes run in one process, alternating (float32, bfloat16, float32, ...), so their times compare within the
run; the per-token products run in the job's default precision (``precision="auto"``) in both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.sensitivity.api import taylor_increase
from bitplan.sensitivity.request import Metric, SensitivityRequest
from bitplan.sensitivity.streamed import streamed_token_fisher
from bitplan.sources import open_lazy
from bitplan.sources.calibration import build_calibration_set
from bitplan.sources.models import load_model, sampled_loss_of_logits, text_loss_of_logits
from bitplan.sources.stream import Boundaries, DecoderStream
from bitplan.sources.units import find_units

PROVENANCE = _own_folder_off_path.sibling("_provenance").provenance


def bf16_folder(model: str, folder: Path) -> None:
    loaded = load_model(model)
    loaded.model.to(torch.bfloat16).save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def predictions(folder: Path, dtype: torch.dtype, batches: list[torch.Tensor]) -> tuple[dict, float]:
    lazy = open_lazy(str(folder))
    lazy.placement = dataclasses.replace(lazy.placement, dtype=dtype)
    units = find_units(lazy.model)
    started = time.perf_counter()
    with Boundaries(2 << 30) as boundaries:
        request = SensitivityRequest(Metric.TOKEN_TAYLOR_KL, bits_options=(2, 3, 4, 8), group_size=128,
                                     precision="auto", curvature_stride=2)
        terms = streamed_token_fisher(DecoderStream(lazy), units, batches, boundaries, request,
                                      loss=text_loss_of_logits, curvature_loss=sampled_loss_of_logits)
    seconds = time.perf_counter() - started
    return {name: taylor_increase(terms.first_order[name], terms.second_order[name],
                                  terms.first_order_std_error[name]) for name in units}, seconds


def block_seconds(seq_len: int, repeats: int) -> dict:
    """One random block of Llama-3.2-1B's shape, forward then the gradient at its input (what the streamed
    backward does per window), in float32 and bfloat16 alternately: seconds of each try."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                                      num_key_value_heads=8, num_hidden_layers=1, vocab_size=256)
    block = transformers.LlamaForCausalLM(config).model.layers[0].eval().requires_grad_(False)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    hidden = torch.randn(1, seq_len, 2048)
    position = rotary(hidden, torch.arange(seq_len)[None])
    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(repeats):
        for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            block.to(dtype)
            x = hidden.clone().requires_grad_(True)
            started = time.perf_counter()
            out = block(x.to(dtype), position_embeddings=tuple(p.to(dtype) for p in position), attention_mask=None)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out.float(), x, grad_outputs=torch.ones_like(x))
            seconds[label].append(round(time.perf_counter() - started, 3))
    return {"block": "llama-3.2-1b", "seq_len": seq_len, "seconds": seconds,
            "speedup_bf16": round(statistics.median(seconds["float32"]) / statistics.median(seconds["bfloat16"]), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--block-1b", action="store_true", help="time one block of the 1B shape instead")
    args = parser.parse_args()
    if args.block_1b:
        sys.stdout.write(json.dumps({**block_seconds(args.seq_len, args.repeats), "command": " ".join(sys.argv),
                                     "provenance": PROVENANCE()}) + "\n")
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        bf16_folder(args.model, folder)
        tokenizer = open_lazy(str(folder)).tokenizer
        tokens = build_calibration_set(tokenizer, text_file=None, num_samples=args.samples, seq_len=args.seq_len,
                                       seed=0).tokens
        batches = list(torch.split(tokens, 1))
        seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        results = {}
        for _ in range(args.repeats):
            for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                results[label], spent = predictions(folder, dtype, batches)
                seconds[label].append(round(spent, 2))
                sys.stderr.write(f"{label}: {spent:.1f} s\n")
    by_scale, by_entry = [], []
    for name, reference in results["float32"].items():
        scale = max(abs(v) for v in reference.values()) or 1.0
        for key, value in reference.items():
            moved = abs(results["bfloat16"][name][key] - value)
            by_scale.append(moved / scale)
            by_entry.append(moved / max(abs(value), 1e-30))
    sys.stdout.write(json.dumps({
        "command": " ".join(sys.argv), "provenance": PROVENANCE(), "model": args.model, "windows": args.samples,
        "seq_len": args.seq_len, "torch": torch.__version__,
        "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "threads": torch.get_num_threads(),
        "seconds": seconds, "speedup_bf16": round(statistics.median(seconds["float32"])
                                                  / statistics.median(seconds["bfloat16"]), 3),
        "relative_to_unit_max": {"median": statistics.median(by_scale), "max": max(by_scale)},
        "relative_per_entry": {"median": statistics.median(by_entry), "max": max(by_entry),
                               "share_over_1e-2": sum(d > 1e-2 for d in by_entry) / len(by_entry)},
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
