"""Fused dequantize-matmul kernel benchmark. Prints one JSON object.

    python bench/kernels.py [--rows 4096] [--cols 4096]

On a CUDA GPU: for a 4-bit matrix and a mixed 3/4-bit matrix (half the column groups each), at batch 1 and 16,
the Triton kernel's time, its achieved memory bandwidth (bytes it must read and write / time) as a fraction of
the bandwidth a device-to-device copy reaches on the same GPU in the same run, and its speed against fp16
``torch.matmul`` of the same shape. On a CPU it says so and times the torch reference path (dequantize + matmul,
and the cached-weight matmul ``QuantLinear`` uses) against a float32 matmul.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.kernels.quant_linear import QuantLinear
from bitplan.kernels.triton_kernels import triton_available
from bitplan.quantizer.mixed import pack_segments, quantize_rtn_mixed


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def make_layer(rows: int, cols: int, group_bits: tuple[int, ...], group_size: int, device: str) -> QuantLinear:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    layer = QuantLinear(cols, rows, bits=max(group_bits), group_size=group_size, bias=False, group_bits=group_bits)
    layer.load_state_dict(pack_segments(quantize_rtn_mixed(weight, group_bits, group_size=group_size)))
    return layer.to(device)


def layer_bytes(layer: QuantLinear) -> int:
    return sum(b.numel() * b.element_size() for name, b in layer.named_buffers() if name != "perm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "kernels", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if cuda else "cpu"},
        "command": " ".join(sys.argv), "shape": [args.rows, args.cols], "group_size": args.group_size,
    }
    n_groups = -(-args.cols // args.group_size)
    settings = {"4bit": (4,) * n_groups, "mixed-3/4bit": tuple(3 if g % 2 else 4 for g in range(n_groups))}
    device = "cuda" if cuda else "cpu"
    if cuda and triton_available():
        source = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        copy_s = timed(lambda: source.clone(), args.repeats, cuda)
        copy_bandwidth = 2 * source.numel() / copy_s  # read + write
        report["copy_bandwidth_gb_s"] = copy_bandwidth / 1e9
        dense = torch.randn(args.rows, args.cols, device=device, dtype=torch.float16)
    else:
        report["note"] = ("no CUDA GPU with Triton here: the fused kernel was not run; these are the torch reference "
                          "path's numbers (the kernels' correctness is tested in TRITON_INTERPRET=1 mode)")
        dense = torch.randn(args.rows, args.cols)
    results = []
    for label, group_bits in settings.items():
        layer = make_layer(args.rows, args.cols, group_bits, args.group_size, device)
        weight_bytes = layer_bytes(layer)
        for batch in (1, 16):
            x = torch.randn(batch, args.cols, device=device, dtype=dense.dtype)
            baseline_s = timed(lambda: torch.matmul(x, dense.T), args.repeats, cuda)
            entry = {"weights": label, "batch": batch, "weight_bytes": weight_bytes,
                     "bits_per_weight": 8 * weight_bytes / (args.rows * args.cols)}
            if cuda and triton_available():
                kernel_s = timed(lambda: layer.forward_triton(x), args.repeats, cuda)
                moved = weight_bytes + x.numel() * x.element_size() + batch * args.rows * 4
                entry.update({"kernel_s": kernel_s, "fp16_matmul_s": baseline_s,
                              "speedup_vs_fp16": baseline_s / kernel_s,
                              "bandwidth_gb_s": moved / kernel_s / 1e9,
                              "bandwidth_fraction_of_copy": moved / kernel_s / copy_bandwidth})
            else:
                layer._weight_cache = None
                dequantize_s = timed(lambda: layer.dequantized_weight(), max(3, args.repeats // 5), cuda)
                cached_s = timed(lambda: layer(x), args.repeats, cuda)
                entry.update({"reference_dequantize_s": dequantize_s, "reference_cached_matmul_s": cached_s,
                              "fp32_matmul_s": baseline_s, "cached_vs_fp32": baseline_s / cached_s})
            results.append(entry)
            sys.stderr.write(json.dumps(entry) + "\n")
    report["results"] = results
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
