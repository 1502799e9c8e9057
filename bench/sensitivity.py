"""Sensitivity benchmark on SmolLM2-135M. Prints one JSON object with:

* every metric's time and peak memory (each in a fresh process, model load included), under each calibration
  set: ``eval-tail`` (the second half of WikiText-2 test: in-domain, disjoint from the evaluated windows) and
  ``builtin`` (the default calibration text, Python's own documentation);
* for a sample of units, the Spearman rank correlation between each metric's predicted loss increase at 3 bits
  and the real increase (quantize that unit alone, measure the WikiText-2 loss over the first windows), with a
  bootstrap interval over units, the real increase's standard error and the correlation that measurement noise
  alone would allow;
* Hessian-vector products: a PyHessian-style double-backward loop (every parameter, as PyHessian takes them)
  against ours (double backward over the quantized units only, and forward-over-reverse jvp), time per probe
  and the trace estimates they give for the same probes.

    python bench/sensitivity.py [--units 40] [--windows 32] [--samples 32] [--text FILE] [--truth EARLIER.json]
                                [--error-bytes 4294967296,268435456]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import _own_folder_off_path  # (before any first-party import)
except ModuleNotFoundError:  # a process spawned by this script: its parent already took the folder off the path
    pass
import numpy as np
import torch
from scipy.stats import spearmanr

from bitplan.job.pipeline import measure_sensitivity
from bitplan.quantizer.rtn import dequantize_weight, quantize_rtn
from bitplan.report.evaluation import tokenize_for_perplexity
from bitplan.sensitivity.api import SECOND_ORDER_HVP_METHODS, functional_loss
from bitplan.sensitivity.blockwise import capture_first_block_inputs
from bitplan.sensitivity.hutchinson import (
    double_backward_hvp,
    estimate_traces,
    forward_over_reverse_hvp,
    gradient_difference_hvp,
)
from bitplan.sensitivity.kl import per_token_kl, swapped_weights
from bitplan.sensitivity.request import HutchinsonConfig, Metric
from bitplan.sources.calibration import build_calibration_set, read_text
from bitplan.sources.models import causal_lm_loss, load_model, use_eager_attention
from bitplan.sources.units import block_index, find_block_stack, find_units
from bitplan.spec import JobSpec

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
METRICS = tuple(metric.value for metric in Metric)  # every registered metric, token_kl and token_taylor_kl included


def _in_child(target: Callable[..., dict[str, Any]], args: tuple[Any, ...], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    started = time.perf_counter()
    payload = target(*args)
    queue.put({**payload, "wall_s": time.perf_counter() - started,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


def in_fresh_process(target: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``target(*args)`` in a spawned process so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_in_child, args=(target, args, queue))
    process.start()
    payload = queue.get()
    process.join()
    return payload


def metric_run(spec: JobSpec) -> dict[str, Any]:
    return {"result": measure_sensitivity(spec, use_cache=False).to_json()}


class LossProbe:
    """The mean token loss of a text's first windows with some units' weights replaced, re-running only the blocks
    from the first replaced one: the hidden states entering every block are computed once for all windows (a Llama
    layout: ``model.model.norm``, ``model.lm_head``); the unquantized loss is checked against the whole model's."""

    def __init__(self, loaded: Any, text: str, windows: int, seq_len: int, *, kl: bool = False) -> None:
        self.model = loaded.model
        self.reference: list[torch.Tensor] | None = None  # the source's log-probabilities per window, with ``kl``
        self.kl_checked = False
        self.units = find_units(self.model)
        self.stack_name, self.stack = find_block_stack(self.model)
        ids = tokenize_for_perplexity(loaded.tokenizer, text)
        self.chunks = [ids[i * seq_len:(i + 1) * seq_len][None] for i in range(min(windows, ids.numel() // seq_len))]
        self.inputs = capture_first_block_inputs(self.model, self.stack, self.chunks)
        self.entering = [list(self.inputs.hidden)]
        with torch.no_grad():
            for block in self.stack:
                self.entering.append([self.inputs.run(block, w, hidden) for w, hidden in enumerate(self.entering[-1])])
        self.base = self.window_scores(len(self.stack))[0]
        if kl:
            self.reference = [torch.log_softmax(logits, dim=-1) for logits in self.window_logits(len(self.stack))]
        with torch.no_grad():
            whole = torch.tensor([float(causal_lm_loss(self.model, c)) / (c.numel() - 1) for c in self.chunks[:2]])
        if not torch.allclose(whole, self.base[:2], rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"cached block inputs do not reproduce the model's loss: {whole} vs {self.base[:2]}")

    @torch.no_grad()
    def window_logits(self, first_block: int) -> Iterator[torch.Tensor]:
        """Each window's float logits at every position that has a next token, from block ``first_block`` on."""
        for w in range(len(self.chunks)):
            hidden = self.entering[first_block][w]
            for block in self.stack[first_block:]:
                hidden = self.inputs.run(block, w, hidden)
            yield self.model.lm_head(self.model.model.norm(hidden))[0, :-1].float()

    def window_scores(self, first_block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each window's mean token loss, and (with ``kl``) its mean per-token KL from the source's distribution."""
        losses, kls = [], []
        for w, logits in enumerate(self.window_logits(first_block)):
            losses.append(float(torch.nn.functional.cross_entropy(logits, self.chunks[w][0, 1:])))
            if self.reference is not None:
                kls.append(float(per_token_kl(self.reference[w], torch.log_softmax(logits, dim=-1)).mean()))
        return torch.tensor(losses), torch.tensor(kls) if kls else None

    def increase(self, name: str, weight: torch.Tensor) -> dict[str, float]:
        """Mean loss increase over the windows of unit ``name`` at ``weight`` alone, and its standard error; with
        ``kl``, also the mean per-token KL from the source's next-token distribution (``kl``, ``kl_std_error``)."""
        with swapped_weights(self.units, {name: weight}):
            losses, kls = self.window_scores(block_index(name, self.stack_name))
            if kls is not None and not self.kl_checked:  # the cached-inputs KL against the whole model's, once
                with torch.no_grad():
                    whole = torch.tensor([float(per_token_kl(reference, torch.log_softmax(
                        self.model(input_ids=chunk).logits[0, :-1].float(), dim=-1)).mean())
                        for reference, chunk in zip(self.reference[:2], self.chunks[:2], strict=False)])
                if not torch.allclose(whole, kls[:2], rtol=1e-3, atol=1e-6):
                    raise RuntimeError(f"cached block inputs do not reproduce the model's KL: {whole} vs {kls[:2]}")
                self.kl_checked = True
        increase = losses - self.base
        root = math.sqrt(len(self.chunks))
        result = {"mean": float(increase.mean()), "std_error": float(increase.std() / root)}
        if kls is not None:
            result.update(kl=float(kls.mean()), kl_std_error=float(kls.std() / root))
        return result


def real_loss_increase(model_ref: str, text: Path, sample: list[str], windows: int, seq_len: int,
                       bits: int) -> dict[str, Any]:
    """Mean WikiText-2 token loss increase (and its standard error over windows) of quantizing each unit alone
    (RTN at ``bits``, group 128), measured by a :class:`LossProbe`."""
    probe = LossProbe(load_model(model_ref), read_text(text), windows, seq_len)
    real = {name: probe.increase(name, dequantize_weight(quantize_rtn(probe.units[name].weight.detach(), bits=bits,
                                                                      group_size=128)))
            for name in sample}
    return {"base_loss": float(probe.base.mean()), "windows": len(probe.chunks), "real": real}


def hvp_probe_times(model_ref: str, method: str, probes: int, seq_len: int,
                    relative_step: float = HutchinsonConfig.relative_step) -> dict[str, Any]:
    """Per-probe time of one Hessian-vector product method on one calibration window; per-unit trace samples."""
    loaded = load_model(model_ref)
    model = loaded.model
    if method in SECOND_ORDER_HVP_METHODS or method == "pyhessian":
        use_eager_attention(model)
    units = find_units(model)
    calib = build_calibration_set(loaded.tokenizer, text_file=None, num_samples=1, seq_len=seq_len)
    batch = calib.tokens
    unit_params = {name: m.weight for name, m in units.items()}
    started = time.perf_counter()
    unit_keys = [f"{name}.weight" for name in unit_params]
    if method == "pyhessian":  # every parameter that requires grad, as PyHessian collects them
        everything = dict(model.named_parameters())
        params = {**{k: everything[k] for k in unit_keys}, **everything}  # unit weights first: same probes
        hvp = double_backward_hvp(causal_lm_loss(model, batch) / batch.numel(), list(params.values()))
    elif method == "double_backward":
        model.requires_grad_(False)
        params = {key: unit_params[key[: -len(".weight")]].requires_grad_(True) for key in unit_keys}
        hvp = double_backward_hvp(causal_lm_loss(model, batch) / batch.numel(), list(params.values()))
    elif method == "gradient_difference":  # first-order only: the model keeps its SDPA attention
        model.requires_grad_(False)
        params = {key: unit_params[key[: -len(".weight")]].requires_grad_(True) for key in unit_keys}
        weights = list(params.values())

        def gradient_at() -> list[torch.Tensor]:
            return list(torch.autograd.grad(causal_lm_loss(model, batch) / batch.numel(), weights))

        hvp = gradient_difference_hvp(gradient_at, weights, relative_step=relative_step)
    else:
        model.requires_grad_(False)
        params = {key: unit_params[key[: -len(".weight")]] for key in unit_keys}
        loss_fn = functools.partial(causal_lm_loss, graph_from_embeddings=False)
        hvp = forward_over_reverse_hvp(functional_loss(model, loss_fn, unit_keys, batch), list(params.values()))
    setup_s = time.perf_counter() - started
    times: list[float] = []

    def timed_hvp(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        begin = time.perf_counter()
        result = hvp(vectors)
        times.append(time.perf_counter() - begin)
        return result

    # The unit weights come first in every method and the seed is shared, so their probes are the same and the
    # unit blocks of the samples are directly comparable (PyHessian's other parameters get probes after them).
    estimates = estimate_traces(timed_hvp, params, min_probes=probes, max_probes=probes, rel_tol=0.0, seed=0)
    return {"setup_s": setup_s, "probe_s": times, "mean_probe_s": sum(times) / len(times),
            "unit_trace_samples": {k: list(estimates[k].samples) for k in unit_keys}}


HVP_METHODS = ("pyhessian", "double_backward", "jvp", "gradient_difference")


def compare_hvp_methods(model_ref: str, probes: int, seq_len: int) -> dict[str, Any]:
    """Each Hessian-vector product method on the same window and the same probes, one after the other in fresh
    processes: time per probe, its ratio to the PyHessian-style loop, and how far each method's per-unit trace
    samples are from exact double backward, beside the spread of those samples across probes (Hutchinson's own
    error, which any method's error should be far below)."""
    runs = {method: in_fresh_process(hvp_probe_times, model_ref, method, probes, seq_len) for method in HVP_METHODS}
    reference = runs["double_backward"]["unit_trace_samples"]
    spread = [float(np.std(values, ddof=1) / max(abs(float(np.mean(values))), 1e-12)) for values in reference.values()]
    result: dict[str, Any] = {"tokens": seq_len, "probes": probes,
                              "median_relative_probe_spread": float(np.median(spread))}
    for method, run in runs.items():
        samples = run["unit_trace_samples"]
        differences = [abs(a - b) / max(abs(b), 1e-12) for k in reference
                       for a, b in zip(samples[k], reference[k], strict=True)]
        totals = [abs(sum(samples[k][i] for k in reference) / sum(reference[k][i] for k in reference) - 1)
                  for i in range(probes)]
        result[method] = {"mean_probe_s": run["mean_probe_s"], "probe_s": run["probe_s"], "setup_s": run["setup_s"],
                          "peak_rss_gb": round(run["peak_rss_gb"], 2),
                          "relative_difference_to_double_backward": {
                              "median_unit_sample": float(np.median(differences)),
                              "p90_unit_sample": float(np.percentile(differences, 90)),
                              "max_unit_sample": max(differences), "max_probe_total": max(totals)}}
    base = result["pyhessian"]["mean_probe_s"]
    for method in HVP_METHODS[1:]:
        result[method]["speedup_per_probe_vs_pyhessian"] = base / result[method]["mean_probe_s"]
    return result


def noise_ceiling(real: dict[str, dict[str, float]], draws: int = 2000) -> float:
    """Mean Spearman correlation between the measured increases and a second measurement with the same noise:
    what a perfect predictor could be expected to reach against this measurement."""
    means = np.array([r["mean"] for r in real.values()])
    errors = np.array([r["std_error"] for r in real.values()])
    rng = np.random.default_rng(0)
    return float(np.mean([spearmanr(means, means + rng.normal(0, errors)).statistic for _ in range(draws)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--units", type=int, default=40)
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 windows for the real loss increase")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows for the metrics")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated ('': skip the correlations)")
    parser.add_argument("--calibration", default="eval-tail,builtin",
                        help="comma-separated: eval-tail (second half of --text) and/or builtin (the default text)")
    parser.add_argument("--truth", type=Path, help="an earlier report whose real increases (same units, windows, "
                                                   "bits) are reused instead of measured again")
    parser.add_argument("--hvp-probes", type=int, default=3, help="probes per Hessian-vector product method (0: skip)")
    parser.add_argument("--error-bytes", default="",
                        help="comma-separated budgets for token_taylor's RTN-error copies, each run once with the "
                             "built-in calibration (time, peak memory, predictions against the first); '': skip")
    args = parser.parse_args()
    if not args.text.is_file():
        raise SystemExit(f"WikiText-2 not found at {args.text}; pass --text FILE")
    report: dict[str, Any] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "sensitivity", "model": args.model, "cpus": os.cpu_count(), "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "calibration": f"{args.calibration}: {args.samples} x {args.seq_len} tokens each",
    }
    if args.metrics:
        report.update(correlation_report(args))
    if args.error_bytes:
        report["token_taylor_error_budgets"] = error_budget_report(args)
    if args.hvp_probes > 0:
        report["hessian_vector_products"] = compare_hvp_methods(args.model, args.hvp_probes, args.seq_len)
    sys.stdout.write(json.dumps(report) + "\n")


def calibration_text(kind: str, text: Path, sample_tokens: int, seq_len: int, windows: int) -> Path | None:
    """``None`` for the built-in text; for ``eval-tail`` the second half of the evaluation text in a temporary
    file (in-domain and disjoint from the evaluated windows, which come from the start of the text)."""
    if kind == "builtin":
        return None
    if kind != "eval-tail":
        raise SystemExit(f"unknown calibration {kind!r}: builtin or eval-tail")
    if windows * seq_len >= sample_tokens // 2:
        raise SystemExit("the evaluated windows reach into the second half of the text; use fewer windows")
    content = read_text(text)
    path = Path(tempfile.mkdtemp()) / "eval-tail.txt"
    path.write_text(content[len(content) // 2:], encoding="utf-8")
    return path


def error_budget_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    """token_taylor under several limits on the RTN-error copies it holds: fewer bytes, more backward passes over
    the calibration set, the same predictions."""
    rows: list[dict[str, Any]] = []
    for budget in (int(b) for b in args.error_bytes.split(",")):
        spec = JobSpec.from_flat(model=args.model, bits_per_weight=4.0, metric="token_taylor",
                                 formats="bitplan-default", num_samples=args.samples, seq_len=args.seq_len,
                                 max_error_bytes=budget)
        payload = in_fresh_process(metric_run, spec)
        predicted = np.array([v for u in payload["result"]["units"] for _, v in sorted(u["delta_loss"].items())])
        first = rows[0]["predicted"] if rows else predicted
        rows.append({"max_error_bytes": budget, "wall_s": round(payload["wall_s"], 1),
                     "sensitivity_s": round(payload["result"]["seconds"], 1),
                     "peak_rss_gb": round(payload["peak_rss_gb"], 2),
                     "max_abs_difference_from_first": float(np.abs(predicted - first).max()),
                     "max_abs_prediction": float(np.abs(predicted).max()), "predicted": predicted})
        sys.stderr.write(f"token_taylor with max_error_bytes {budget}: {payload['wall_s']:.1f} s, "
                         f"{payload['peak_rss_gb']:.2f} GB\n")
    for row in rows:
        del row["predicted"]
    return rows


def bootstrap_values(statistic: Callable[[np.ndarray], float], count: int, draws: int = 2000) -> np.ndarray:
    """``statistic(pick)`` over ``draws`` resamples of ``count`` units with replacement (seeded; a resample with
    fewer than three distinct units, or a NaN statistic, is left out)."""
    rng = np.random.default_rng(0)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, count, count)
        if len(set(pick.tolist())) > 2:
            values.append(statistic(pick))
    kept = np.array(values, dtype=float)
    return kept[~np.isnan(kept)]


def bootstrap_interval(predicted: list[float], real: list[float], draws: int = 2000) -> list[float]:
    """90% interval of the Spearman correlation over units resampled with replacement."""
    x, y = np.array(predicted), np.array(real)
    values = bootstrap_values(lambda pick: spearmanr(x[pick], y[pick]).statistic, len(x), draws)
    return [float(np.percentile(values, 5)), float(np.percentile(values, 95))]


def correlation_report(args: argparse.Namespace) -> dict[str, Any]:
    """Every metric's run (time, peak memory) under each calibration set, and the rank correlation of its 3-bit
    prediction with the real loss increase of quantizing each sampled unit alone."""
    report: dict[str, Any] = {
        "real_loss": {"text": str(args.text), "seq_len": args.seq_len, "bits": args.bits, "group_size": 128}}
    loaded = load_model(args.model)
    names = list(find_units(loaded.model))
    text_tokens = tokenize_for_perplexity(loaded.tokenizer, read_text(args.text)).numel()
    del loaded
    sample = sorted(random.Random(0).sample(names, args.units), key=names.index)
    previous = json.loads(args.truth.read_text()) if args.truth else None
    if previous and [u["name"] for u in previous["units"]] == sample and previous["real_loss"]["windows"] == min(
            args.windows, text_tokens // args.seq_len) and previous["real_loss"]["bits"] == args.bits:
        real = {u["name"]: {"mean": u["real_delta_loss"], "std_error": u["std_error"]} for u in previous["units"]}
        measured = {"windows": previous["real_loss"]["windows"], "base_loss": previous["real_loss"]["base_loss"],
                    "real": real, "reused_from": str(args.truth)}
    else:
        started = time.perf_counter()
        measured = in_fresh_process(real_loss_increase, args.model, args.text, sample, args.windows, args.seq_len,
                                    args.bits)
        measured["seconds"] = round(time.perf_counter() - started, 1)
        real = measured["real"]
    report["real_loss"].update({key: measured[key] for key in ("windows", "base_loss", "seconds", "reused_from")
                                if key in measured})
    report["real_loss"]["noise_ceiling_spearman"] = noise_ceiling(real)
    report["units"] = [{"name": n, "real_delta_loss": real[n]["mean"], "std_error": real[n]["std_error"]}
                       for n in sample]
    truth = [real[n]["mean"] for n in sample]
    report["metrics"] = {}
    for kind in args.calibration.split(","):
        text = calibration_text(kind, args.text, text_tokens, args.seq_len, args.windows)
        table = report["metrics"][kind] = {}
        for metric in args.metrics.split(","):
            spec = JobSpec.from_flat(model=args.model, bits_per_weight=4.0, metric=metric, formats="bitplan-default",
                                     num_samples=args.samples, seq_len=args.seq_len, calibration_text=text)
            payload = in_fresh_process(metric_run, spec)
            predicted = {u["name"]: u["delta_loss"][str(args.bits)] for u in payload["result"]["units"]}
            guess = [predicted[n] for n in sample]
            table[metric] = {"spearman": float(spearmanr(guess, truth).statistic),
                             "spearman_bootstrap_90": bootstrap_interval(guess, truth),
                             "wall_s": round(payload["wall_s"], 1),
                             "sensitivity_s": round(payload["result"]["seconds"], 1),
                             "peak_rss_gb": round(payload["peak_rss_gb"], 2),
                             "warnings": payload["result"]["warnings"], "predicted": guess}
            sys.stderr.write(f"{kind} {metric}: rho {table[metric]['spearman']:.3f}, {payload['wall_s']:.1f} s\n")
    return report


if __name__ == "__main__":
    main()
