"""Does the sensitivity told each format's real error rank layers better than the RTN proxy? And does the default
calibration's ranking transfer to text of other domains?

For each format (default: ``int3-g128`` encoded by ``--quantizer`` (default ``rtn-salience``: the salience-
calibrated grid), and llama.cpp's ``Q3_K`` encoded by its own ``ggml_quantize_chunk``), a seeded sample of the
units that can hold it. Each unit's predicted loss increase comes from the job's default metric (``token_taylor_kl``) on
the default calibration (the built-in text, ``--samples`` x ``--seq-len``) in one pass, twice per unit:

* ``real``: told the format's own weight error ``decode(encode(W)) - W`` (its encoder, our importance vector);
* ``rtn_proxy``: told plain RTN's error at the format's width and group 128 (what a job was told before formats).

The truth is the real mean token-loss increase of quantizing that unit alone to the format (nothing else
changed) on the first ``--windows`` windows of each evaluation text: WikiText-2 test (encyclopedia prose) and the
held-back text of the quality check (standard-library docstrings: technical prose, not the calibration text).
Prints one JSON object: per format and text, the Spearman rank correlation of each prediction with the truth, a
bootstrap 90% interval over units, the correlation that the truth's own window noise would allow, and the paired
difference real - proxy with its interval (``real_minus_rtn_proxy``). The same quantization's mean per-token KL from
the source model's next-token distribution is measured on the same windows (``real_kl`` per unit), and every
prediction is scored against it too (``against_kl``): the allocation minimizes KL to the source, whose slope is zero,
so its rule (a negative slope counted as 0) is meant to rank that, while the signed prediction is meant to rank the
loss change.

    python bench/format_spearman.py [--formats int3-g128,Q3_K] [--units 30] [--windows 16]
    python bench/format_spearman.py --truth bench/results/format-spearman-smollm2-2026-12-03.json  # predictions only
    python bench/format_spearman.py --truth ... --skip-first-position  # the square without each window's first token
    python bench/format_spearman.py --truth ... --metric token_kl  # labels drawn from the model: second-order KL
    python bench/format_spearman.py --truth ... --metric token_taylor  # the text's labels for slope and curvature

Besides the metric's rule, its signed prediction (``_signed``) and its second-order term alone (``token_fisher`` under
``token_taylor``, ``token_kl`` under ``token_taylor_kl``) are scored too, and every unit's terms are in ``per_unit``.
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
import numpy as np
import torch
from scipy.stats import spearmanr

from bitplan.job.quantize import encode_unit
from bitplan.quantizer.formats import FORMATS, decode_weight
from bitplan.quantizer.rtn import quantization_error
from bitplan.report.quality import heldout_text
from bitplan.sensitivity.api import CURVATURE_STRIDE, taylor_increase
from bitplan.sensitivity.importance import input_energy
from bitplan.sensitivity.request import Metric, SensitivityRequest
from bitplan.sensitivity.token_fisher import token_fisher
from bitplan.sources.calibration import build_calibration_set, read_text
from bitplan.sources.models import causal_lm_loss, causal_lm_sampled_loss, load_model
from bitplan.sources.units import find_block_stack, find_units
from bitplan.spec import JobSpec

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
sensitivity_bench = _own_folder_off_path.sibling("sensitivity")


def paired_difference(first: list[float], second: list[float], truth: list[float], draws: int = 2000
                      ) -> dict[str, Any]:
    """Spearman(first, truth) - Spearman(second, truth), with its 90% interval over units resampled with
    replacement (the same units for both predictors in each draw: the two rankings share most of their error, so
    the difference is far better resolved than either correlation's own interval suggests) and the share of draws
    in which the first is at least as high."""
    a, b, y = np.array(first), np.array(second), np.array(truth)
    kept = sensitivity_bench.bootstrap_values(
        lambda pick: spearmanr(a[pick], y[pick]).statistic - spearmanr(b[pick], y[pick]).statistic, len(y), draws)
    return {"difference": float(spearmanr(a, y).statistic - spearmanr(b, y).statistic),
            "bootstrap_90": [float(np.percentile(kept, 5)), float(np.percentile(kept, 95))],
            "share_of_draws_at_least_as_high": float(np.mean(kept >= 0))}


def scored(truth: list[float], names: list[str], guesses: dict[str, dict[str, dict[str, float]]], fmt: str,
           kind_key: Any) -> dict[str, Any]:
    """Every predictor's Spearman correlation with ``truth`` (told real / told the proxy, with its bootstrap
    interval), whether the real error ranks at least as high under the metric's rule, and each paired difference."""
    row: dict[str, Any] = {}
    for predictor, guess in guesses.items():
        for kind in ("real", "rtn_proxy"):
            values = [guess[n][f"{kind}:{fmt}"] for n in names]
            row[kind_key(kind, predictor)] = {"spearman": float(spearmanr(values, truth).statistic),
                                              "spearman_bootstrap_90": sensitivity_bench.bootstrap_interval(values,
                                                                                                            truth)}
    row["real_at_least_as_high"] = row["real"]["spearman"] >= row["rtn_proxy"]["spearman"]
    for predictor, guess in guesses.items():
        row[kind_key("real_minus_rtn_proxy", predictor)] = paired_difference(
            [guess[n][f"real:{fmt}"] for n in names], [guess[n][f"rtn_proxy:{fmt}"] for n in names], truth)
    return row


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
    parser.add_argument("--truth", type=Path, help="an earlier result of this bench with the same --formats, --units "
                        "and --windows: reuse its measured increases (the same seeded units, the same encoded "
                        "weights) and run only the predictions")
    parser.add_argument("--skip-first-position", action="store_true",
                        help="leave each window's first position (the attention sink) out of the second-order sum")
    parser.add_argument("--metric", choices=("token_taylor", "token_kl", "token_taylor_kl"), default="token_taylor_kl",
                        help="token_taylor (the text's labels, the empirical Fisher and the first-order term) or "
                             "token_kl (labels drawn from the model's own next-token distribution: the second-order "
                             "KL to the source model) or token_taylor_kl (the text's slope, the "
                             "model's curvature: two backward passes, the second on every --curvature-stride-th "
                             "window; the job's default)")
    parser.add_argument("--curvature-stride", type=int, default=CURVATURE_STRIDE,
                        help="token_taylor_kl: the model-label pass on every k-th calibration window")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "format_spearman", "model": args.model, "metric": args.metric, "quantizer": args.quantizer,
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
    loss_fn = causal_lm_sampled_loss if args.metric == "token_kl" else causal_lm_loss
    curvature = args.metric == "token_taylor_kl"
    report["curvature_stride"] = args.curvature_stride if curvature else None
    request = SensitivityRequest(Metric(args.metric), bits_options=(3,), group_size=128, options=options,
                                 error_of=error_of, skip_first_position=args.skip_first_position,
                                 curvature_stride=args.curvature_stride if curvature else None)
    terms = token_fisher(loaded.model, sampled, batches, request, loss_fn=loss_fn,
                         curvature_loss_fn=causal_lm_sampled_loss if curvature else None,
                         blocks=find_block_stack(loaded.model)[1])
    report["skip_first_position"] = args.skip_first_position
    report["sensitivity_s"] = round(time.perf_counter() - predicted_started, 1)
    # each predictor of every (unit, option): token_taylor or token_taylor_kl as the allocation uses it (shrunk first
    # order, a negative one counted as 0, plus second order), the same with the slope's sign kept (the prediction of
    # the loss change itself: "_signed"), and the second-order term alone (token_fisher; token_kl for
    # token_taylor_kl's curvature); or token_kl alone (labels drawn from the model, a first-order term zero in
    # expectation)
    primary = args.metric
    guesses = {"token_kl": terms.second_order} if primary == "token_kl" else {
        primary: {n: taylor_increase(terms.first_order[n], terms.second_order[n],
                                     terms.first_order_std_error[n], monotone=False) for n in sampled},
        f"{primary}_signed": {n: taylor_increase(terms.first_order[n], terms.second_order[n],
                                                 terms.first_order_std_error[n], monotone=False, signed=True)
                              for n in sampled},
        "token_fisher" if primary == "token_taylor" else "token_kl": terms.second_order}
    known = {} if args.truth is None else json.loads(args.truth.read_text())["results"]
    texts = {"wikitext2-test": read_text(args.text), "heldout-docstrings": heldout_text()}
    report["truth_from"] = None if args.truth is None else str(args.truth)
    report["results"] = {}

    def kind_key(kind: str, predictor: str) -> str:
        return kind if predictor == primary else f"{kind}_{predictor}"

    for text_name, text in texts.items():
        truth_started = time.perf_counter()
        probe = None if args.truth else sensitivity_bench.LossProbe(loaded, text, args.windows, args.seq_len, kl=True)
        for fmt, names in samples.items():
            if probe is None:
                reused = {u["name"]: {"mean": u["real_delta_loss"], "std_error": u["std_error"],
                                      **({"kl": u["real_kl"], "kl_std_error": u["kl_std_error"]} if "real_kl" in u
                                         else {})}
                          for u in known[fmt][text_name]["per_unit"]}
                if sorted(reused) != sorted(names):
                    raise SystemExit(f"--truth {args.truth} measured other units for {fmt}")
                real = {name: reused[name] for name in names}
                row: dict[str, Any] = {"units": len(names), "windows": known[fmt][text_name]["windows"],
                                       "noise_ceiling_spearman": known[fmt][text_name]["noise_ceiling_spearman"]}
            else:
                real = {name: probe.increase(name, encoded[(name, fmt)]) for name in names}
                row = {"units": len(names), "windows": len(probe.chunks),
                       "noise_ceiling_spearman": sensitivity_bench.noise_ceiling(real)}
            row.update(scored([real[n]["mean"] for n in names], names, guesses, fmt, kind_key))
            if all("kl" in real[n] for n in names):  # the KL to the source, and what its window noise allows
                row["against_kl"] = {"noise_ceiling_spearman": sensitivity_bench.noise_ceiling(
                    {n: {"mean": real[n]["kl"], "std_error": real[n]["kl_std_error"]} for n in names}),
                    **scored([real[n]["kl"] for n in names], names, guesses, fmt, kind_key)}
            row["per_unit"] = [{"name": n, "real_delta_loss": real[n]["mean"], "std_error": real[n]["std_error"],
                                **({"real_kl": real[n]["kl"], "kl_std_error": real[n]["kl_std_error"]}
                                   if "kl" in real[n] else {}),
                                "predicted_real": guesses[primary][n][f"real:{fmt}"],
                                "predicted_rtn_proxy": guesses[primary][n][f"rtn_proxy:{fmt}"],
                                **{f"{term}_{kind}": by_unit[n][f"{kind}:{fmt}"]
                                   for term, by_unit in (("first_order", terms.first_order),
                                                         ("first_order_std_error", terms.first_order_std_error),
                                                         ("second_order", terms.second_order))
                                   for kind in ("real", "rtn_proxy")}} for n in names]
            report["results"].setdefault(fmt, {})[text_name] = row
            sys.stderr.write(f"{fmt} on {text_name}: " + "; ".join(
                f"{predictor}: real {row[kind_key('real', predictor)]['spearman']:.3f}, proxy "
                f"{row[kind_key('rtn_proxy', predictor)]['spearman']:.3f}" for predictor in guesses) + "\n")
        report.setdefault("truth_s", {})[text_name] = round(time.perf_counter() - truth_started, 1)
        del probe
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
