"""``bitplan`` command line. With ``--json`` the last stdout line is one JSON object; progress goes to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from allocator.problem import SOLVERS
from bitplan.errors import BitplanError

logger = logging.getLogger("bitplan")


class Progress:
    """``on_progress(stage, done, total)`` drawn as one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def emit(payload: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _cmd_models(args: argparse.Namespace) -> None:
    from bitplan.models import BUNDLED_MODELS

    emit([{"id": m.id, "package": m.package.replace("_", "-"), "description": m.description}
           for m in BUNDLED_MODELS.values()], args.json)


def _parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BitplanError(f"--bits takes comma-separated integers such as 2,3,4,8, got {text!r}") from None


def _parse_pin(text: str) -> tuple[str, int]:
    pattern, _, bits = text.rpartition("=")
    try:
        return pattern, int(bits)
    except ValueError:
        raise BitplanError(f"--pin takes PATTERN=BITS such as 'model.layers.0.*=8', got {text!r}") from None


def _parse_budgets(text: str | None) -> list[float]:
    if text is None:
        return []
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BitplanError(
            f"--bpw takes a number or comma-separated numbers such as 3.5 or 3,3.5,4, got {text!r}") from None
    if not budgets:
        raise BitplanError("--bpw needs at least one number")
    return budgets


def _cmd_run(args: argparse.Namespace) -> None:
    from bitplan.pipeline import RunConfig, run_budgets

    budgets = _parse_budgets(args.bpw)
    config = RunConfig(
        model=args.model, out_dir=Path(args.out), bits_per_weight=budgets[0] if budgets else None,
        budget_bytes=args.bytes,
        uniform_bits=args.uniform_bits, candidate_bits=_parse_bits(args.bits), group_size=args.group_size,
        metric=args.metric, calibration_text=None if args.calibration is None else Path(args.calibration),
        num_samples=args.samples, seq_len=args.seq_len, seed=args.seed, solver=args.solver,
        tie_fused=args.tie_fused, pinned=tuple(_parse_pin(text) for text in args.pin), use_cache=not args.no_cache,
        quantizer=args.quantizer, mix_groups=args.mix_groups, kl_refine_windows=args.kl_refine,
    )
    out = Path(args.out)
    if len(budgets) > 1:
        out_dirs = [out / f"bpw-{b:g}" for b in budgets]
    else:
        out_dirs = [out]
    progress = Progress(not args.quiet)
    try:
        results = run_budgets(config, budgets or [None], out_dirs=out_dirs, on_progress=progress)
    finally:
        progress.close()
    if len(results) == 1:
        emit(results[0].to_json(), args.json)
    else:
        emit({"runs": [r.to_json() for r in results]}, args.json)


def _cmd_sensitivity(args: argparse.Namespace) -> None:
    from bitplan.pipeline import RunConfig, measure_sensitivity

    bits = _parse_bits(args.bits)
    config = RunConfig(model=args.model, out_dir=Path("."), uniform_bits=None, bits_per_weight=float(max(bits)),
                       candidate_bits=bits, group_size=args.group_size, metric=args.metric,
                       calibration_text=None if args.calibration is None else Path(args.calibration),
                       num_samples=args.samples, seq_len=args.seq_len, seed=args.seed, use_cache=not args.no_cache)
    progress = Progress(not args.quiet)
    try:
        result = measure_sensitivity(config, on_progress=progress)
    finally:
        progress.close()
    emit(result.to_json(), args.json)


def _cmd_eval(args: argparse.Namespace) -> None:
    from bitplan.calibration import read_text
    from bitplan.evaluation import perplexity, tokenize_for_perplexity

    if (args.artifact is None) == (args.model is None):
        raise BitplanError("give exactly one of --artifact DIR or --model REF")
    if args.artifact is not None:
        from bitplan.artifact import load_artifact

        model, tokenizer, manifest = load_artifact(Path(args.artifact))
        kind = manifest["model_kind"]
    else:
        from bitplan.models import load_model

        loaded = load_model(args.model)
        model, tokenizer, kind = loaded.model, loaded.tokenizer, loaded.kind.value
    if kind != "causal-lm":
        raise BitplanError(f"perplexity needs a causal language model; this model is a {kind}")
    if args.seq_len < 2 or (args.max_windows is not None and args.max_windows < 1):
        raise BitplanError(f"need --seq-len >= 2 and --max-windows >= 1, got {args.seq_len} and {args.max_windows}")
    ids = tokenize_for_perplexity(tokenizer, read_text(Path(args.text)))
    progress = Progress(not args.quiet)
    try:
        result = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.max_windows, on_progress=progress)
    except ValueError as error:
        raise BitplanError(str(error)) from None
    finally:
        progress.close()
    payload = result.to_json()
    payload["artifact" if args.artifact else "model"] = args.artifact or args.model
    emit(payload, args.json)


def _cmd_allocate(args: argparse.Namespace) -> None:
    from allocator import problem_from_json, solve_allocation

    path = Path(args.problem)
    if not path.is_file():
        raise BitplanError(f"problem file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BitplanError(f"problem file {path} is not valid JSON: {error}") from None
    problem = problem_from_json(data)
    if args.frontier:
        from allocator.frontier import frontier

        points, kind = frontier(problem, kind=args.frontier_kind)
        logger.info("frontier: %d %s breakpoints", len(points), kind)
        emit(points, args.json)
        return
    emit(solve_allocation(problem, solver=args.solver, time_limit_s=args.time_limit).to_json(), args.json)


def _cmd_export(args: argparse.Namespace) -> None:
    from bitplan.exports import export_artifact

    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise BitplanError(f"artifact directory not found: {artifact}")
    emit(export_artifact(artifact, format=args.format, out=Path(args.out)).to_json(), args.json)


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The command line; ``extend(subparsers)`` adds commands of layers above this one (the service's)."""
    parser = argparse.ArgumentParser(prog="bitplan", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    if extend is not None:
        extend(sub)

    models = sub.add_parser("models", help="list the bundled models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=_cmd_models)

    run = sub.add_parser("run", help="allocate bits, quantize and write an artifact")
    run.add_argument("--model", required=True, help="bundled id, HF folder, .safetensors or .gguf file")
    budget = run.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bpw", help="budget in effective bits per weight (scales and zeros counted); several "
                                      "comma-separated budgets share one sensitivity pass and write OUT/bpw-B")
    budget.add_argument("--bytes", type=int, help="budget in bytes of the quantized layers")
    budget.add_argument("--uniform-bits", type=int, help="uniform baseline: every unit at this bit width")
    run.add_argument("--out", required=True, help="artifact directory to write")
    run.add_argument("--bits", default="2,3,4,8", help="candidate bit widths (default 2,3,4,8)")
    run.add_argument("--group-size", type=int, default=128)
    from bitplan.pipeline import METRIC_CHOICES

    run.add_argument("--metric", default="auto", choices=METRIC_CHOICES)
    run.add_argument("--calibration", help="calibration text file (default: built-in text)")
    run.add_argument("--samples", type=int, default=32, help="calibration windows")
    run.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--solver", default="auto", choices=[s for s in SOLVERS if s != "brute_force"])
    run.add_argument("--tie-fused", action="store_true",
                     help="q/k/v and gate/up projections of a block share one bit width (fused by runtimes)")
    run.add_argument("--pin", action="append", default=[], metavar="PATTERN=BITS",
                     help="keep units matching an fnmatch pattern at BITS (repeatable), e.g. '*.down_proj=8'")
    from quantizer.methods import QUANTIZERS

    run.add_argument("--quantizer", default="rtn", choices=QUANTIZERS,
                     help="rtn: round to nearest (-symmetric: grid symmetric around 0); gptq: GPTQ error feedback on "
                          "calibration inputs (give in-domain --calibration text); -salience: each group's range "
                          "searched to minimize input-energy-weighted error (SliM-LLM)")
    run.add_argument("--mix-groups", action="store_true",
                     help="column groups of each layer take bits-1, bits or bits+1 within the layer's size (SliM-LLM)")
    run.add_argument("--kl-refine", type=int, default=0, metavar="N",
                     help="re-solve once with each block's measured share of the output KL on N calibration windows "
                          "(checked on N others; kept only if the KL drops). 0: off")
    run.add_argument("--no-cache", action="store_true",
                     help="measure sensitivities again instead of reusing cached ones ($BITPLAN_CACHE_DIR)")
    run.add_argument("--json", action="store_true")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    sens = sub.add_parser("sensitivity", help="predicted loss increase per (unit, bit width)")
    sens.add_argument("--model", required=True)
    sens.add_argument("--metric", default="auto", choices=METRIC_CHOICES)
    sens.add_argument("--bits", default="2,3,4,8")
    sens.add_argument("--group-size", type=int, default=128)
    sens.add_argument("--calibration")
    sens.add_argument("--samples", type=int, default=32)
    sens.add_argument("--seq-len", type=int, default=512)
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--no-cache", action="store_true", help="measure again instead of reusing a cached result")
    sens.add_argument("--json", action="store_true")
    sens.add_argument("--quiet", action="store_true")
    sens.set_defaults(func=_cmd_sensitivity)

    evaluate = sub.add_parser("eval", help="perplexity of an artifact or a float model on a text file")
    evaluate.add_argument("--artifact")
    evaluate.add_argument("--model")
    evaluate.add_argument("--text", required=True)
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.add_argument("--max-windows", type=int)
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    from bitplan.exports.common import EXPORT_FORMATS

    export = sub.add_parser("export", help="export an artifact to a format other runtimes load")
    export.add_argument("--artifact", required=True, help="artifact directory written by bitplan run")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="a .gguf file, or a folder for compressed-tensors")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=_cmd_export)

    allocate = sub.add_parser("allocate", help="solve a JSON allocation problem")
    allocate.add_argument("--problem", required=True)
    allocate.add_argument("--solver", default="auto", choices=SOLVERS)
    allocate.add_argument("--frontier", action="store_true",
                          help="print every breakpoint of the distortion-versus-bytes frontier instead")
    allocate.add_argument("--frontier-kind", default="auto", choices=("auto", "exact", "hull"),
                          help="exact: every Pareto-optimal integer allocation (dynamic program, small problems); "
                               "hull: the breakpoints of its convex hull (any size); auto: exact when it stays "
                               "under a million points, else hull")
    allocate.add_argument("--time-limit", type=float, default=60.0)
    allocate.add_argument("--json", action="store_true")
    allocate.set_defaults(func=_cmd_allocate)
    return parser


def main(argv: Sequence[str] | None = None, *, extend: Callable[[Any], None] | None = None) -> int:
    args = build_parser(extend).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (BitplanError, ValueError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
