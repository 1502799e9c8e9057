"""Does the sensitivity told each format's real error rank layers better than the RTN proxy? And does the default
calibration's ranking transfer to text of other domains?

For each format (default: ``int3-g128`` encoded by ``--quantizer`` (default ``rtn-salience``: the salience-
calibrated grid), and llama.cpp's ``Q3_K`` encoded by its own ``ggml_quantize_chunk``), a seeded sample of the
units that can hold it. Each unit's predicted loss increase comes from the default metric (``token_taylor``) on
the default calibration (the built-in text, ``--samples`` x ``--seq-len``) in one pass, twice per unit:

* ``real``: told the format's own weight error ``decode(encode(W)) - W`` (its encoder, our importance vector);
* ``rtn_proxy``: told plain RTN's error at the format's width and group 128 (what a job was told before formats).

The truth is the real mean token-loss increase of quantizing that unit alone to the format (nothing else
changed) on the first ``--windows`` windows of each evaluation text: WikiText-2 test (encyclopedia prose) and the
held-back text of the quality check (standard-library docstrings: technical prose, not the calibration text).
Prints one JSON object: per format and text, the Spearman rank correlation of each prediction with the truth, a
bootstrap 90% interval over units, and the correlation that the truth's own window noise would allow.

    python bench/format_spearman.py [--formats int3-g128,Q3_K] [--units 30] [--windows 16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import _own_folder_off_path
import torch
from scipy.stats import spearmanr

from bitplan.calibration import build_calibration_set, read_text
from bitplan.models import causal_lm_loss, load_model
from bitplan.quality import heldout_text
from bitplan.quantize import encode_unit
from bitplan.quantizer.formats import FORMATS, decode_weight
from bitplan.quantizer.rtn import quantization_error
from bitplan.sensitivity import Metric, compute_sensitivity
from bitplan.sensitivity.importance import input_energy
from bitplan.spec import JobSpec
from bitplan.units import find_block_stack, find_units

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
sensitivity_bench = _own_folder_off_path.sibling("sensitivity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default="int3-g128,Q3_K")
    parser.add_argument("--quantizer", default="rtn-salience", help="our integer grids' encoder")
    parser.add_argument("--units", type=int, default=30)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (the built-in text)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "format_spearman", "model": args.model, "metric": "token_taylor", "quantizer": args.quantizer,
        "calibration": f"built-in text, {args.samples} x {args.seq_len} tokens", "windows": args.windows,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "command": " ".join(sys.argv),
    }
    loaded = load_model(args.model)
    units = find_units(loaded.model)
    calib = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=args.samples, seq_len=args.seq_len)
    batches = list(torch.split(calib.tokens, 1))
    importance = input_energy(loaded.model, units, batches)
    formats = args.formats.split(",")
    spec = JobSpec.from_flat(model=args.model, bits_per_weight=4.0, formats=",".join(formats),
                             quantizer=args.quantizer)
    samples = {}
    for index, fmt in enumerate(formats):
        legal = [n for n, m in units.items() if FORMATS[fmt].legal(tuple(m.weight.shape))]
        samples[fmt] = sorted(random.Random(index).sample(legal, min(args.units, len(legal))), key=list(units).index)
    encoded = {(name, fmt): decode_weight(encode_unit(spec, units[name].weight, fmt, importance, name))
               for fmt, names in samples.items() for name in names}

    def error_of(name: str, key: Any) -> torch.Tensor:
        kind, fmt = str(key).split(":", 1)
        weight = units[name].weight.detach().float()
        if kind == "real":
            return encoded[(name, fmt)] - weight
        return quantization_error(weight, bits=FORMATS[fmt].nominal_bits, group_size=128)

    sampled = {name: units[name] for name in units if any(name in names for names in samples.values())}
    options = {name: [f"{kind}:{fmt}" for fmt in formats if name in samples[fmt] for kind in ("real", "rtn_proxy")]
               for name in sampled}
    predicted_started = time.perf_counter()
    predicted = compute_sensitivity(loaded.model, sampled, batches, metric=Metric.TOKEN_TAYLOR, bits_options=[3],
                                    group_size=128, loss_fn=causal_lm_loss, blocks=find_block_stack(loaded.model),
                                    options=options, error_of=error_of)
    report["sensitivity_s"] = round(time.perf_counter() - predicted_started, 1)
    guess = {u.name: u.delta_loss for u in predicted.units}
    texts = {"wikitext2-test": read_text(args.text), "heldout-docstrings": heldout_text()}
    report["results"] = {}
    for text_name, text in texts.items():
        truth_started = time.perf_counter()
        probe = sensitivity_bench.LossProbe(loaded, text, args.windows, args.seq_len)
        for fmt, names in samples.items():
            real = {name: probe.increase(name, encoded[(name, fmt)]) for name in names}
            truth = [real[n]["mean"] for n in names]
            row: dict[str, Any] = {"units": len(names), "windows": len(probe.chunks),
                                   "noise_ceiling_spearman": sensitivity_bench.noise_ceiling(real)}
            for kind in ("real", "rtn_proxy"):
                values = [guess[n][f"{kind}:{fmt}"] for n in names]
                row[kind] = {"spearman": float(spearmanr(values, truth).statistic),
                             "spearman_bootstrap_90": sensitivity_bench.bootstrap_interval(values, truth)}
            row["real_at_least_as_high"] = row["real"]["spearman"] >= row["rtn_proxy"]["spearman"]
            row["per_unit"] = [{"name": n, "real_delta_loss": real[n]["mean"], "std_error": real[n]["std_error"],
                                "predicted_real": guess[n][f"real:{fmt}"],
                                "predicted_rtn_proxy": guess[n][f"rtn_proxy:{fmt}"]} for n in names]
            report["results"].setdefault(fmt, {})[text_name] = row
            sys.stderr.write(f"{fmt} on {text_name}: real {row['real']['spearman']:.3f}, "
                             f"proxy {row['rtn_proxy']['spearman']:.3f}\n")
        report.setdefault("truth_s", {})[text_name] = round(time.perf_counter() - truth_started, 1)
        del probe
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
