"""Our GGML encoders against llama.cpp's (issue 42, item 2): per type, the importance-weighted error
``sum_j importance_j (w_j - decoded_j)^2`` summed over a model's block-linear tensors, ours (``--encoder bitplan``)
and llama.cpp's ``ggml_quantize_chunk`` with the same importance vectors, and the seconds each spends.

The importance is what a job hands the encoders: each unit's calibration input energy (``sum_t x_t^2`` per input
column, :func:`bitplan.sensitivity.importance.input_energy`) on ``--samples`` windows of the built-in text. Every
``--block-stride``-th transformer block's linear layers are encoded (all seven of each), so that a run fits a
shared 2-core machine. Both encoders run on one torch/llama.cpp thread; both are decoded by the ``gguf`` package.

The bundled SmolLM2 is a Q4_1 file whose weights lie on Q4_1's grid; give its rotated float source
(``bench/float_source.py``, issue 42 item 1) as ``--model`` for weights on no grid:

    python bench/ggml_encoders.py --model /tmp/fs/run/smollm2-135m-rotated-f16.gguf [--types Q4_K,Q6_K]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Any

import _own_folder_off_path
import torch
from gguf import GGMLQuantizationType as T

from bitplan.hashing import sha256_file
from bitplan.quantizer.ggml import dequantize_ggml
from bitplan.quantizer.ggml_encode import bitplan_types, encode_ggml
from bitplan.sensitivity.importance import input_energy
from bitplan.sources.calibration import build_calibration_set
from bitplan.sources.models import load_model, resolve_reference
from bitplan.sources.units import find_units


def _encode_all(weights: dict[str, torch.Tensor], energy: dict[str, torch.Tensor], qtype: T,
                encoder: str) -> tuple[float, float]:
    """The summed importance-weighted error of every weight in ``qtype`` by ``encoder``, and the seconds spent."""
    error, seconds = 0.0, 0.0
    for name, weight in weights.items():
        started = time.perf_counter()
        blocks = encode_ggml(weight, qtype, energy[name], encoder=encoder)
        seconds += time.perf_counter() - started
        error += float(((dequantize_ggml(blocks, qtype) - weight).double() ** 2 * energy[name].double()).sum())
    return error, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled id or a model file (a .gguf)")
    parser.add_argument("--types", default=",".join(t.name for t in bitplan_types()), help="GGML types")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows for the input energy")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--block-stride", type=int, default=6, help="encode every k-th block's linear layers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, path = resolve_reference(args.model)
    report: dict[str, Any] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "ggml_encoders", "model": args.model,
        "model_sha256": sha256_file(path) if path.is_file() else None,
        "importance": f"calibration input energy (sum of squared inputs per column), built-in text, "
                      f"{args.samples} x {args.seq_len} tokens",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    loaded = load_model(args.model)
    units = find_units(loaded.model)
    calib = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=args.samples, seq_len=args.seq_len)
    energy = input_energy(loaded.model, units, list(torch.split(calib.tokens, 1)))
    blocks = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in units if ".layers." in n})
    chosen = set(blocks[::args.block_stride])
    names = [n for n in units if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) in chosen]
    weights = {n: units[n].weight.detach().float().clone() for n in names}
    report["tensors"] = {"count": len(names), "weights": sum(w.numel() for w in weights.values()),
                         "blocks": sorted(chosen)}
    rows = {}
    for name in args.types.split(","):
        qtype = T[name]
        legal = {n: w for n, w in weights.items() if w.shape[1] % 256 == 0 or qtype in (T.Q4_0, T.Q4_1, T.Q5_0,
                                                                                         T.Q5_1, T.Q8_0, T.IQ4_NL)}
        ours, ours_s = _encode_all(legal, energy, qtype, "bitplan")
        theirs, theirs_s = _encode_all(legal, energy, qtype, "llama.cpp")
        rows[name] = {"tensors": len(legal), "error_bitplan": ours, "error_llama_cpp": theirs,
                      "ratio": ours / theirs, "seconds_bitplan": round(ours_s, 2),
                      "seconds_llama_cpp": round(theirs_s, 2)}
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)  # noqa: T201 (progress of a bench)
    report["types"] = rows
    report["every_type_better"] = all(r["ratio"] < 1 for r in rows.values())
    print(json.dumps(report, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
