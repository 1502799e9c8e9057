"""``bitplan`` command line. With ``--json`` the last stdout line is one JSON object; progress goes to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bitplan.allocator.problem import SOLVERS
from bitplan.errors import BitplanError, ExitCode

logger = logging.getLogger("bitplan")


class HelpFormatter(argparse.HelpFormatter):
    """Wider help columns; each generated flag's help already ends with its default."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=120)


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
        elif total != self.bar.total or done < self.bar.n:  # the stage counts anew (issue 45: "1/1" then "2it")
            self.bar.reset(total=total)
        self.bar.update(min(done, total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def emit(payload: Any, as_json: bool) -> None:
    if hasattr(payload, "to_dict"):  # a response model of the service's client
        payload = payload.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _cmd_models(args: argparse.Namespace) -> None:
    from bitplan.sources.models import BUNDLED_MODELS

    emit([{"id": m.id, "package": m.package.replace("_", "-"), "description": m.description}
           for m in BUNDLED_MODELS.values()], args.json)


def _cmd_run(args: argparse.Namespace) -> None:
    from bitplan.cli_options import spec_from_args
    from bitplan.job.pipeline import run_budgets

    spec = spec_from_args(args)
    out = Path(args.out)
    check_writable(out)
    out_dirs = [out / f"bpw-{b:g}" for b in spec.budget.bits_per_weight] if spec.budgets > 1 else [out]
    progress = Progress(not args.quiet)
    try:
        results = run_budgets(spec, out_dirs=out_dirs, on_progress=progress, use_cache=not args.no_cache)
    finally:
        progress.close()
    if len(results) == 1:
        emit(results[0].to_json(), args.json)
    else:
        emit({"runs": [r.to_json() for r in results]}, args.json)


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be written before any heavy work."""
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not out.is_dir()):
        raise BitplanError(f"cannot write the output folder {out}: {parent} is not writable or {out} is a file",
                           param="out")


SENSITIVITY_OPTIONS = ("model", "calibration_text", "num_samples", "seq_len", "seed", "metric", "max_error_bytes",
                       "precision", "candidate_bits", "group_size")


def _cmd_sensitivity(args: argparse.Namespace) -> None:
    from bitplan.cli_options import given_options
    from bitplan.job.pipeline import measure_sensitivity
    from bitplan.spec import Allocation, JobSpec, Quantization

    options = given_options(args)
    bits = options.get("candidate_bits", Allocation().candidate_bits)
    group_size = options.get("group_size", Quantization().group_size)
    spec = JobSpec.from_flat(**options, bits_per_weight=max(bits) + 32 / group_size)  # a budget inside the range
    progress = Progress(not args.quiet)
    try:
        result = measure_sensitivity(spec, on_progress=progress, use_cache=not args.no_cache)
    finally:
        progress.close()
    emit(result.to_json(), args.json)


def _cmd_eval(args: argparse.Namespace) -> None:
    from bitplan.report.evaluation import perplexity, tokenize_for_perplexity
    from bitplan.sources.calibration import read_text

    if (args.artifact is None) == (args.model is None):
        raise BitplanError("give exactly one of --artifact DIR or --model REF")
    if args.artifact is not None:
        from bitplan.targets.artifact import load_artifact

        model, tokenizer, manifest = load_artifact(args.artifact)
        kind = manifest.model_kind
    else:
        from bitplan.sources.models import load_model

        loaded = load_model(args.model)
        model, tokenizer, kind = loaded.model, loaded.tokenizer, loaded.kind.value
    if kind != "causal-lm":
        raise BitplanError(f"perplexity needs a causal language model; this model is a {kind}")
    if args.seq_len < 2 or (args.max_windows is not None and args.max_windows < 1):
        raise BitplanError(f"need --seq-len >= 2 and --max-windows >= 1, got {args.seq_len} and {args.max_windows}")
    from bitplan.report.quality import HELDOUT_SOURCE, heldout_text

    text = heldout_text() if args.text is None else read_text(Path(args.text))
    ids = tokenize_for_perplexity(tokenizer, text)
    progress = Progress(not args.quiet)
    try:
        result = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.max_windows, on_progress=progress)
    except ValueError as error:
        raise BitplanError(str(error)) from None
    finally:
        progress.close()
    payload = result.to_json()
    payload["artifact" if args.artifact else "model"] = args.artifact or args.model
    payload["text"] = HELDOUT_SOURCE if args.text is None else args.text
    emit(payload, args.json)


def _cmd_allocate(args: argparse.Namespace) -> None:
    from bitplan.allocator import problem_from_json, solve_allocation

    path = Path(args.problem)
    if not path.is_file():
        raise BitplanError(f"problem file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BitplanError(f"problem file {path} is not valid JSON: {error}") from None
    problem = problem_from_json(data)
    if args.frontier:
        from bitplan.allocator.frontier import frontier

        points, kind = frontier(problem, kind=args.frontier_kind)
        logger.info("frontier: %d %s breakpoints", len(points), kind)
        emit(points, args.json)
        return
    emit(solve_allocation(problem, solver=args.solver, time_limit_s=args.time_limit).to_json(), args.json)


def _cmd_latency(args: argparse.Namespace) -> None:
    from bitplan.job.planning import unit_sizes
    from bitplan.quantizer.formats import resolve_formats
    from bitplan.report.latency import cached_table, measure_table, store_table
    from bitplan.sources.models import load_model
    from bitplan.sources.units import find_units

    loaded = load_model(args.model)
    names = resolve_formats(args.formats)
    used = {f for options in unit_sizes(find_units(loaded.model), (), 8, names, "gguf").values() for f in options}
    types = [f for f in names if f in used]
    table = None if args.measure else cached_table(loaded.source_sha256, types)
    source = "cached"
    if table is None:
        progress = Progress(True)
        try:
            table = measure_table(args.model, types, rounds=args.rounds, on_progress=progress, loaded=loaded)
        finally:
            progress.close()
        store_table(table)
        source = "measured"
    if args.out:
        Path(args.out).write_text(json.dumps(table.to_json(), indent=1, sort_keys=True) + "\n")
    emit({**table.to_json(), "source": source, "target": args.target}, args.json)


def _cmd_formats(args: argparse.Namespace) -> None:
    from bitplan.quantizer.formats import FORMATS, REFERENCE_SHAPE

    emit([{"name": f.name, "family": f.family, "bits_per_weight": f.bits_per_weight(),
           "reference_shape": list(REFERENCE_SHAPE), "needs_importance": f.needs_importance}
          for f in FORMATS.values()], args.json)


def _cmd_export(args: argparse.Namespace) -> None:
    from bitplan.targets.exports import export_artifact

    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise BitplanError(f"artifact directory not found: {artifact}")
    emit(export_artifact(artifact, format=args.format, out=Path(args.out), inexact=args.inexact).to_json(), args.json)


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

    from bitplan.cli_options import add_spec_arguments

    run = sub.add_parser("run", help="allocate bits, quantize and write an artifact", formatter_class=HelpFormatter)
    add_spec_arguments(run)
    run.add_argument("--out", required=True, help="artifact directory to write (OUT/bpw-B for each budget of a sweep)")
    run.add_argument("--no-cache", action="store_true",
                     help="measure sensitivities again instead of reusing cached ones ($BITPLAN_CACHE_DIR)")
    run.add_argument("--json", action="store_true", help="print the result as one JSON line")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    sens = sub.add_parser("sensitivity", help="predicted loss increase per (unit, bit width)",
                          formatter_class=HelpFormatter)
    add_spec_arguments(sens, only=SENSITIVITY_OPTIONS)
    sens.add_argument("--no-cache", action="store_true", help="measure again instead of reusing a cached result")
    sens.add_argument("--json", action="store_true", help="print the result as one JSON line")
    sens.add_argument("--quiet", action="store_true", help="no progress bars")
    sens.set_defaults(func=_cmd_sensitivity)

    _add_tool_commands(sub)
    return parser


def _add_tool_commands(sub: Any) -> None:
    """``eval``, ``export``, ``formats`` and ``allocate``."""
    formats = sub.add_parser("formats", help="list the quantization formats (bits per weight on a 4096 x 4096 weight)")
    formats.add_argument("--json", action="store_true", help="print the list as one JSON line")
    formats.set_defaults(func=_cmd_formats)
    evaluate = sub.add_parser("eval", help="perplexity of an artifact or a float model on a text file")
    evaluate.add_argument("--artifact")
    evaluate.add_argument("--model")
    evaluate.add_argument("--text", help="text file (default: the built-in held-back text, "
                                         "Python's standard-library docstrings)")
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.add_argument("--max-windows", type=int)
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    from bitplan.targets.exports import EXPORTERS

    export = sub.add_parser("export", help="export an artifact to a format other runtimes load")
    export.add_argument("--artifact", required=True, help="artifact directory written by bitplan run")
    export.add_argument("--format", required=True, choices=sorted(EXPORTERS))
    export.add_argument("--out", required=True, help="a .gguf file, or a folder for compressed-tensors")
    export.add_argument("--inexact", choices=("refuse", "reencode", "exact"), default=None,
                        help="gguf: layers no GGML type holds exactly at their size are refused (default, naming "
                             "them), re-encoded by llama.cpp's quantizer at their width, or kept exact in a larger "
                             "type; the report gives the size change")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=_cmd_export)

    latency = sub.add_parser("latency", help="this machine's latency table for a model (measured, or cached)",
                             formatter_class=HelpFormatter)
    latency.add_argument("--target", default="gguf", choices=("gguf",),
                         help="the runtime timed: gguf (llama.cpp on this CPU through llama-cpp-python)")
    latency.add_argument("--model", default="smollm2-135m", help="bundled id or GGUF file")
    latency.add_argument("--formats", default="gguf-k", help="the GGML types to time (a preset or a list)")
    latency.add_argument("--measure", action="store_true", help="measure again even when a cached table exists")
    latency.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per variant (medians)")
    latency.add_argument("--out", help="also write the table to this file (for --latency-table on another machine)")
    latency.add_argument("--json", action="store_true")
    latency.set_defaults(func=_cmd_latency)

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


def main(argv: Sequence[str] | None = None, *, extend: Callable[[Any], None] | None = None) -> int:
    args = build_parser(extend).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")  # logs only with -v: the bars say enough
    if args.verbose:
        logging.getLogger("httpx").setLevel(logging.INFO)
    try:
        args.func(args)
    except (BitplanError, ValueError) as error:
        sys.stderr.write(f"error: {error}\n")
        code = error.exit_code if isinstance(error, BitplanError) else ExitCode.BAD_INPUT
        if getattr(args, "json", False):  # the last stdout line stays one JSON object, for scripts
            sys.stdout.write(json.dumps({"error": {
                "code": getattr(error, "code", "invalid_input"), "message": str(error),
                "param": getattr(error, "param", None), "exit_code": int(code),
                **(getattr(error, "details", None) or {})}}) + "\n")
        return int(code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
