"""Latency of the gguf target on this CPU, measured through llama.cpp (llama-cpp-python's ``libllama``).

The model: a token's decode time is a fixed part (embeddings, output head, attention over the context, the
runtime's overhead) plus, for every GGML type, a time per weight of the block-linear tensors stored in it
(reading and dequantizing them dominates decoding at batch 1). Prefill per prompt token has the same form with
its own coefficients. The coefficients are fitted (non-negative least squares, ``scipy.optimize.nnls``) on whole
model variants whose tensors take chosen types, timed interleaved (every variant once per round, A B A B ...) and
reported as medians over rounds. A table is keyed by the machine's fingerprint (CPU model, threads, library
versions), the source model and the types, and cached as JSON under ``$BITPLAN_CACHE_DIR/latency``; a table
measured on one machine can be given to a job on another as a file (``--latency-table``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitplan.errors import BitplanError
from bitplan.sensitivity.cache import default_cache_dir

TABLE_VERSION = 1
PROMPT_TOKENS = 32  # prefill: one batch of this many tokens
DECODE_TOKENS = 48  # decode steps timed after the prompt (batch 1)
ROUNDS = 5  # interleaved rounds per variant
FIT_MIXTURES = 4  # random per-tensor mixtures added to the fitting variants


def threads() -> int:
    """Threads llama.cpp runs with here: ``$BITPLAN_LATENCY_THREADS``, else the cores this process may use."""
    configured = os.environ.get("BITPLAN_LATENCY_THREADS")
    return int(configured) if configured else len(os.sched_getaffinity(0))


def fingerprint() -> dict[str, Any]:
    """What a latency table depends on besides the model: CPU model, thread count, library versions."""
    import llama_cpp

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": threads(), "system": platform.system(), "llama_cpp_python": llama_cpp.__version__}


@dataclass(frozen=True)
class LatencyTable:
    """Fitted decode and prefill coefficients for one machine, model and set of GGML types."""

    fingerprint: dict[str, Any]
    model_sha256: str
    types: list[str]
    decode_fixed_ms: float
    decode_ms_per_mweight: dict[str, float]  # per type: decode ms per token per million weights stored in it
    prefill_fixed_ms: float
    prefill_ms_per_mweight: dict[str, float]
    fit: dict[str, Any] = field(default_factory=dict)  # variants, their measured and predicted times, residuals
    version: int = TABLE_VERSION

    @property
    def key(self) -> str:
        return table_key(self.fingerprint, self.model_sha256, self.types)

    def unit_ms(self, fmt: str, numel: int, *, prefill: bool = False) -> float:
        """Decode (or prefill) milliseconds per token that a tensor of ``numel`` weights in ``fmt`` adds."""
        per = self.prefill_ms_per_mweight if prefill else self.decode_ms_per_mweight
        if fmt not in per:
            raise BitplanError(f"the latency table has no timing for {fmt!r}; it covers {', '.join(self.types)}",
                               param="formats")
        return per[fmt] * numel / 1e6

    def predict(self, numel_by_type: dict[str, int], *, prefill: bool = False) -> float:
        """Predicted milliseconds per token of a model with this many block-linear weights in each type."""
        fixed = self.prefill_fixed_ms if prefill else self.decode_fixed_ms
        return fixed + sum(self.unit_ms(t, n, prefill=prefill) for t, n in numel_by_type.items())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyTable:
        values = {k: v for k, v in data.items() if k != "key"}
        try:
            table = cls(**values)
        except TypeError as error:
            raise BitplanError(f"not a bitplan latency table: {error}", param="latency_table") from None
        if table.version != TABLE_VERSION:
            raise BitplanError(f"latency table version {table.version} is not {TABLE_VERSION}; measure it again",
                               param="latency_table")
        return table


def table_key(machine: dict[str, Any], model_sha256: str, types: list[str]) -> str:
    canonical = json.dumps({"machine": machine, "model": model_sha256, "types": sorted(types),
                            "version": TABLE_VERSION, "prompt": PROMPT_TOKENS, "decode": DECODE_TOKENS},
                           sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_path(key: str) -> Path:
    return default_cache_dir() / "latency" / f"{key}.json"


def cached_table(model_sha256: str, types: list[str]) -> LatencyTable | None:
    path = cache_path(table_key(fingerprint(), model_sha256, types))
    return LatencyTable.from_json(json.loads(path.read_text())) if path.is_file() else None


def store_table(table: LatencyTable) -> Path:
    path = cache_path(table.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(table.to_json(), indent=1, sort_keys=True) + "\n")
    os.replace(staging, path)
    return path


# ---------------------------------------------------------------------------------------------- timing


def time_files(paths: list[Path], *, rounds: int = ROUNDS, n_threads: int | None = None,
               on_round: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """Decode and prefill milliseconds per token of each GGUF file: all loaded at once, each timed once per
    round in turn (interleaved), medians over rounds (each round's decode time is the median of its steps)."""
    import llama_cpp

    from bitplan.report.llama_runtime import plain_cpu_buffers

    plain_cpu_buffers()
    count = n_threads or threads()
    models = [llama_cpp.Llama(model_path=str(p), n_ctx=PROMPT_TOKENS + DECODE_TOKENS + 8, n_batch=PROMPT_TOKENS,
                              n_threads=count, n_threads_batch=count, verbose=False, seed=0) for p in paths]
    prompt = [int(t) for t in models[0].tokenize(b"The quick brown fox jumps over the lazy dog. " * 8)][:PROMPT_TOKENS]
    decode: list[list[float]] = [[] for _ in paths]
    prefill: list[list[float]] = [[] for _ in paths]
    try:
        for index in range(rounds + 1):  # round 0 warms every file's pages and caches, and is not counted
            for i, model in enumerate(models):
                model.reset()
                started = time.perf_counter()
                model.eval(prompt)
                prefill_ms = 1000 * (time.perf_counter() - started) / len(prompt)
                steps = []
                for k in range(DECODE_TOKENS):
                    started = time.perf_counter()
                    model.eval([prompt[k % len(prompt)]])
                    steps.append(1000 * (time.perf_counter() - started))
                if index > 0:
                    prefill[i].append(prefill_ms)
                    decode[i].append(statistics.median(steps))
            if on_round is not None:
                on_round(index)
    finally:
        for model in models:
            model.close()
    return [{"decode_ms": statistics.median(d), "prefill_ms": statistics.median(p),
             "decode_spread_pct": 100 * (max(d) - min(d)) / statistics.median(d)} for d, p in zip(decode, prefill,
                                                                                                 strict=True)]


# ---------------------------------------------------------------------------------------------- variants


def variant_assignments(shapes: dict[str, tuple[int, int]], types: list[str], legal: Callable[[str, tuple[int, int]],
                        bool], *, mixtures: int, seed: int) -> list[dict[str, str]]:
    """The fitting design: one variant per type (every tensor that can hold it takes it, the others the base
    type), and ``mixtures`` random per-tensor mixtures; the base is the widest type every tensor can hold."""
    everywhere = [t for t in types if all(legal(t, s) for s in shapes.values())]
    if not everywhere:
        raise BitplanError("no candidate GGML type can hold every tensor; add Q8_0 or Q4_0 to the formats",
                           param="formats")
    base = everywhere[-1] if "Q8_0" not in everywhere else "Q8_0"
    design = [dict.fromkeys(shapes, base)]
    for fmt in types:
        if fmt != base:
            design.append({name: fmt if legal(fmt, shape) else base for name, shape in shapes.items()})
    design += random_mixtures(shapes, types, legal, count=mixtures, seed=seed)
    return design


def random_mixtures(shapes: dict[str, tuple[int, int]], types: list[str],
                    legal: Callable[[str, tuple[int, int]], bool], *, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` assignments with every tensor at a random type it can hold."""
    rng = random.Random(seed)
    return [{name: rng.choice([t for t in types if legal(t, shape)]) for name, shape in shapes.items()}
            for _ in range(count)]


def write_variants(loaded: Any, model_ref: str, assignments: list[dict[str, str]], folder: Path) -> list[Path]:
    """One GGUF per assignment (unit -> GGML type) of the loaded model, each tensor encoded by llama.cpp's own
    quantizer, written by the gguf target's writer; the source's other tensors and metadata as they are."""
    import torch

    from bitplan.quantizer.formats import FORMATS
    from bitplan.sources.units import find_units
    from bitplan.targets.artifact import write_artifact
    from bitplan.targets.exports import export_artifact
    from bitplan.targets.manifest import RunRecord, SensitivityRecord, SolverRecord, SourceRecord

    units = find_units(loaded.model)
    paths = []
    for index, assignment in enumerate(assignments):
        quantized = {name: FORMATS[fmt].encode(units[name].weight.detach().float(),  # timing: any importance
                                               torch.ones(units[name].in_features) if FORMATS[fmt].needs_importance
                                               else None) for name, fmt in assignment.items()}
        record = RunRecord(source=SourceRecord(reference=model_ref, format=loaded.source_format,
                                               sha256=loaded.source_sha256),
                           budget={"latency_variant": index}, group_size=32, candidate_bits=[],
                           solver=SolverRecord(name=None, status="uniform", objective=None, lower_bound=None,
                                               solve_s=None),
                           sensitivity=SensitivityRecord(metric=None, warnings=[]), calibration=None,
                           quantizer="llama.cpp ggml_quantize_chunk", mix_groups=False)
        artifact = folder / f"variant-{index}"
        write_artifact(artifact, model=loaded.model, tokenizer=loaded.tokenizer, kind=loaded.kind,
                       quantized=quantized, run=record, float_dtype=torch.float16, formats=assignment)
        paths.append(folder / f"variant-{index}.gguf")
        export_artifact(artifact, format="gguf", out=paths[-1])
        shutil.rmtree(artifact)
    return paths


def numel_by_type(assignment: dict[str, str], numel: dict[str, int]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for name, fmt in assignment.items():
        totals[fmt] = totals.get(fmt, 0) + numel[name]
    return totals


def fit(types: list[str], counts: list[dict[str, int]], times: list[float]) -> tuple[float, dict[str, float]]:
    """Non-negative least squares of ``time = fixed + sum_t k_t * mweights_t``, relative to each time (so every
    variant weighs the same in percent). Variants of one model hold the same weights in total, so there the fixed
    part and a common per-weight part trade off (NNLS settles on one split): predictions for that model do not
    depend on it, the reported ``fixed`` alone means little."""
    import numpy as np
    from scipy.optimize import nnls

    design = np.array([[1.0, *(c.get(t, 0) / 1e6 for t in types)] for c in counts])
    target = np.array(times)
    solution, _ = nnls(design / target[:, None], np.ones(len(times)))
    return float(solution[0]), {t: float(v) for t, v in zip(types, solution[1:], strict=True)}


def measure_table(model_ref: str, types: list[str], *, rounds: int = ROUNDS, mixtures: int = FIT_MIXTURES,
                  seed: int = 0, on_progress: Callable[[str, int, int], None] | None = None,
                  loaded: Any = None) -> LatencyTable:
    """Fit a table for ``model_ref`` (``loaded``: that model already loaded) on this machine: write the fitting
    variants, time them, fit."""
    from bitplan.job.planning import legal_for_target
    from bitplan.sources.models import load_model
    from bitplan.sources.units import find_units

    loaded = load_model(model_ref) if loaded is None else loaded
    units = find_units(loaded.model)
    shapes = {name: (m.out_features, m.in_features) for name, m in units.items()}
    numel = {name: m.weight.numel() for name, m in units.items()}
    legal = lambda fmt, shape: legal_for_target("gguf", fmt, shape)  # noqa: E731
    design = variant_assignments(shapes, types, legal, mixtures=mixtures, seed=seed)
    with tempfile.TemporaryDirectory(prefix="bitplan-latency-") as folder:
        if on_progress is not None:
            on_progress("latency table", 0, rounds + 2)
        paths = write_variants(loaded, model_ref, design, Path(folder))
        timed = time_files(paths, rounds=rounds, on_round=None if on_progress is None else
                           lambda r: on_progress("latency table", r + 2, rounds + 2))
    counts = [numel_by_type(a, numel) for a in design]
    decode_fixed, decode = fit(types, counts, [t["decode_ms"] for t in timed])
    prefill_fixed, prefill = fit(types, counts, [t["prefill_ms"] for t in timed])
    table = LatencyTable(fingerprint=fingerprint(), model_sha256=loaded.source_sha256, types=list(types),
                         decode_fixed_ms=decode_fixed, decode_ms_per_mweight=decode, prefill_fixed_ms=prefill_fixed,
                         prefill_ms_per_mweight=prefill)
    residuals = [100 * (table.predict(c) - t["decode_ms"]) / t["decode_ms"] for c, t in zip(counts, timed, strict=True)]
    return LatencyTable(**{**asdict(table), "fit": {
        "variants": len(design), "rounds": rounds, "prompt_tokens": PROMPT_TOKENS, "decode_tokens": DECODE_TOKENS,
        "decode_ms": [t["decode_ms"] for t in timed], "prefill_ms": [t["prefill_ms"] for t in timed],
        "decode_residual_pct_median_abs": statistics.median(abs(r) for r in residuals),
        "measured_on": time.strftime("%Y-%m-%d")}})


def latency_table(model_ref: str, model_sha256: str, types: list[str], *, table_file: Path | None = None,
                  on_progress: Callable[[str, int, int], None] | None = None, loaded: Any = None
                  ) -> tuple[LatencyTable, str]:
    """The table a job uses: from ``table_file`` (measured elsewhere; its model must match), else this machine's
    cached one, else measured now and cached. Also says which (``file``, ``cached``, ``measured``)."""
    if table_file is not None:
        try:
            table = LatencyTable.from_json(json.loads(Path(table_file).read_text()))
        except (OSError, ValueError) as error:
            raise BitplanError(f"cannot read the latency table {table_file}: {error}", param="latency_table") from None
        if table.model_sha256 != model_sha256:
            raise BitplanError("the latency table was measured on another model (its model_sha256 differs)",
                               param="latency_table")
        missing = sorted(set(types) - set(table.types))
        if missing:
            raise BitplanError(f"the latency table has no timing for {', '.join(missing)}", param="latency_table")
        return table, "file"
    table = cached_table(model_sha256, types)
    if table is not None:
        return table, "cached"
    table = measure_table(model_ref, types, on_progress=on_progress, loaded=loaded)
    store_table(table)
    return table, "measured"
