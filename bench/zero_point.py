"""Our asymmetric grid's integer zero point (the range widened to include 0, ``zero = round(-min / scale)``, as
GPTQ stores it) against a fractional fp16 offset (``zero = -min / scale``, the range not widened: llama.cpp's
Q4_1 arithmetic), on SmolLM2-135M at uniform widths and group sizes: relative weight MSE over the 210 block
linear layers and WikiText-2 perplexity (first ``--windows`` windows of 512). Both store one fp16 scale and one
fp16 zero per group (the same bytes) and decode the same way, ``(code - zero) * scale``. Prints one JSON object.

    python bench/zero_point.py [--windows 16] [--configs int:4:128,float:4:128,...]

The bundled SmolLM2 file is Q4_1: its block weights already lie on a 4-bit grid of 32 columns with an fp16 scale
and an fp16 minimum, which the fractional offset at 4 bits and groups of 32 reproduces (to fp16's rounding of the
offset) and the integer zero point does not. What this bench decided is whether that carries to other grids:
it does not. On 2026-12-04 (32 windows, ``bench/results/zero-point-smollm2-2026-12-04.json``) the fractional offset
had the lower weight MSE everywhere but the higher perplexity everywhere except the source's own grid (4 bits,
groups of 32: 28.33, the source's 28.34, against 35.77): 46.5 against 38.2 at 4 bits in groups of 128, 473 against
139 at 3 bits. So our grids keep the integer zero point; the one grid where the offset wins is this file's own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.quantizer.rtn import dequantize_weight, quantize_offset, quantize_rtn
from bitplan.report.evaluation import perplexity, tokenize_for_perplexity
from bitplan.sources.calibration import read_text
from bitplan.sources.models import load_model

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--configs", default="int:4:128,float:4:128,int:4:32,float:4:32,int:3:128,float:3:128",
                        help="ZERO:BITS:GROUP, ZERO int (today's grid) or float (fractional offset)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    model = loaded.model
    token_ids = tokenize_for_perplexity(loaded.tokenizer, read_text(args.text))
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"}
    source = {name: module.weight.data.clone() for name, module in layers.items()}
    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {
        "source": {"rel_mse": 0.0, "ppl": perplexity(model, token_ids, seq_len=512, max_windows=args.windows).ppl}}
    for config in args.configs.split(","):
        zero, bits, group = config.split(":")
        error = total = 0.0
        for name, module in layers.items():
            weight = source[name].float()
            if zero == "int":
                rounded = dequantize_weight(quantize_rtn(weight, bits=int(bits), group_size=int(group)))
            else:
                rounded = dequantize_weight(quantize_offset(weight, bits=int(bits), group_size=int(group)))
            error += (rounded - weight).pow(2).sum().item()
            total += weight.pow(2).sum().item()
            module.weight.data.copy_(rounded.to(module.weight.dtype))
        results[config] = {"rel_mse": error / total,
                           "ppl": perplexity(model, token_ids, seq_len=512, max_windows=args.windows).ppl}
        sys.stderr.write(f"{config} {results[config]}\n")
    report = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "zero-point", "model": args.model, "text": str(args.text), "seq_len": 512,
        "windows": args.windows,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv), "results": results, "total_s": round(time.perf_counter() - started, 1),
    }
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
