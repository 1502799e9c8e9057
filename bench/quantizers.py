"""Quantizers compared on SmolLM2-135M: WikiText-2 perplexity (512-token windows, the first 64) of RTN, RTN with
salience calibration, GPTQ and GPTQ with salience calibration, at uniform 3 and 4 bits and at the mixed 3.5
effective bits per weight our allocator picks, with each quantizer's time. Prints one JSON object.

    python bench/quantizers.py [--text ../shared/data/wikitext2/wiki.test.raw] [--windows 64]

Every quantizer gets the same calibration Gram matrices (32 x 512 tokens) and, at 3.5 bits, the same allocation
(token-level Fisher sensitivities on the same tokens, exact solver), so only the rounding differs. Calibration
text: ``--calibration builtin`` (the default text a job uses when given none, Python's documentation) or
``eval-tail`` (the second half of the evaluation text, disjoint from the evaluated windows: in-domain data).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _own_folder_off_path  # (before any first-party import)
import torch

from bitplan.job.pipeline import calibrate_and_measure
from bitplan.job.planning import budgets_in_bytes, solve_plan, unit_sizes
from bitplan.job.quantize import input_grams
from bitplan.job.refine import refine_allocation
from bitplan.quantizer.methods import QUANTIZERS, quantize_unit
from bitplan.quantizer.rtn import dequantize_weight
from bitplan.quantizer.sizes import stored_bytes
from bitplan.report.evaluation import perplexity, tokenize_for_perplexity
from bitplan.sensitivity.cache import SensitivityCache
from bitplan.sensitivity.kl import swapped_weights
from bitplan.sources.calibration import read_text
from bitplan.sources.models import load_model
from bitplan.sources.units import find_block_stack, find_units
from bitplan.spec import JobSpec

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--mixed-bpw", type=float, default=3.5)
    parser.add_argument("--quantizers", default=",".join(QUANTIZERS))
    parser.add_argument("--calibration", choices=("builtin", "eval-tail"), default="eval-tail")
    parser.add_argument("--settings", default="uniform-3,uniform-4,mixed",
                        help="which of uniform-3, uniform-4 and mixed (at --mixed-bpw) to measure")
    parser.add_argument("--mix-groups", action="store_true",
                        help="also measure the mixed setting with widths mixed inside layers (--mix-groups)")
    parser.add_argument("--kl-refine", type=int, default=0, metavar="N",
                        help="also measure the mixed setting re-solved with block KL shares on N calibration windows "
                             "(bitplan.job.refine), once per quantizer")
    args = parser.parse_args()
    report: dict[str, object] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "quantizers", "model": args.model, "text": str(args.text), "seq_len": args.seq_len,
        "windows": args.windows, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    started = time.perf_counter()
    loaded = load_model(args.model)
    units = find_units(loaded.model)
    text = read_text(args.text)
    ids = tokenize_for_perplexity(loaded.tokenizer, text)
    calibration_text = None
    if args.calibration == "eval-tail":
        first_windows = args.windows * args.seq_len
        if first_windows >= ids.numel() // 2:
            raise SystemExit("the evaluated windows reach into the second half of the text; use fewer windows")
        calibration_text = Path(tempfile.mkdtemp()) / "eval-tail.txt"
        calibration_text.write_text(text[len(text) // 2 :], encoding="utf-8")

    def ppl() -> float:
        return perplexity(loaded.model, ids, seq_len=args.seq_len, max_windows=args.windows).ppl

    report["float_ppl"] = ppl()
    spec = JobSpec.from_flat(model=args.model, bits_per_weight=args.mixed_bpw, num_samples=args.samples,
                             calibration_text=calibration_text, formats="bitplan-default")  # widths: per-width rows
    report["calibration"] = args.calibration
    group_size = spec.quantization.group_size
    sizes = unit_sizes(units, spec.widths, group_size)
    numel = sum(m.weight.numel() for m in units.values())
    clock = time.perf_counter()
    measured = calibrate_and_measure(spec, loaded, units, None, None, SensitivityCache(None))
    sensitivity, tokens = measured.sensitivity, measured.tokens
    report["sensitivity_s"] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    grams = input_grams(loaded, units, tokens, None, None)
    report["grams_s"] = round(time.perf_counter() - clock, 1)
    [budget] = budgets_in_bytes(spec, sizes, numel)
    mixed = solve_plan(spec, sizes, sensitivity, budget_bytes=budget, numel=numel).bits
    every = {"uniform-3": (dict.fromkeys(units, 3), False), "uniform-4": (dict.fromkeys(units, 4), False),
             "mixed": (mixed, False)}
    settings = {}
    for name in args.settings.split(","):
        label = f"mixed-{args.mixed_bpw:g}" if name == "mixed" else name
        settings[label] = every[name]
        if name == "mixed" and args.mix_groups:
            settings[f"{label}+mix-groups"] = (mixed, True)
        if name == "mixed" and args.kl_refine:
            settings[f"{label}+kl-refine"] = (None, False)  # re-solved per quantizer below
    originals = {name: module.weight.detach().clone() for name, module in units.items()}
    results = []
    for label, (chosen, mix_groups) in settings.items():  # chosen None: the mixed allocation, KL-refined
        for method in args.quantizers.split(","):

            def quantize(bits_of: dict[str, int], method: str = method, mix_groups: bool = mix_groups
                         ) -> dict[str, Any]:
                return {name: quantize_unit(originals[name], method=method, bits=bits_of[name],
                                            group_size=group_size, gram=grams[name], mix_groups=mix_groups)
                        for name in units}

            refinement = None
            if chosen is None:
                refinement = refine_allocation(
                    loaded.model, units, find_block_stack(loaded.model)[0], sensitivity, mixed, quantize(mixed),
                    tokens[-2 * args.kl_refine:], solve=lambda predicted: solve_plan(
                        spec, sizes, predicted, budget_bytes=budget, numel=numel).bits,
                    quantize=lambda allocations: [quantize(bits_of) for bits_of in allocations])
            bits_of = chosen if refinement is None else refinement.chosen
            clock = time.perf_counter()
            quantized = quantize(bits_of)
            quantize_s = time.perf_counter() - clock
            size = sum(stored_bytes(q) for q in quantized.values())
            with swapped_weights(units, {name: dequantize_weight(q) for name, q in quantized.items()}):
                quantized_ppl = ppl()
            entry = {"setting": label, "quantizer": method, "bits_per_weight": 8 * size / numel, "bytes": size,
                     "quantize_s": round(quantize_s, 2), "ppl": quantized_ppl,
                     "layers_with_mixed_groups": sum(q.group_bits is not None for q in quantized.values()),
                     "units_per_bits": dict(sorted(Counter(bits_of.values()).items()))}
            if refinement is not None:
                entry["kl_refinement"] = refinement.report
            results.append(entry)
            sys.stderr.write(json.dumps(entry) + "\n")
    report["results"] = results
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
