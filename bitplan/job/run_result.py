"""What a run reports (:class:`RunResult`, the CLI's and the worker's JSON contract) and what its measuring steps
hand on (:class:`Measured`): the records :mod:`bitplan.job.pipeline` and :mod:`bitplan.job.streamed_job` both build."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from bitplan.job.planning import Plan
from bitplan.job.quantize import Importance, Quantized
from bitplan.quantizer.formats import GgmlWeight, encoded_bytes
from bitplan.sensitivity import SensitivityResult
from bitplan.sources.moe import RoutingReport
from bitplan.spec import JobSpec
from bitplan.targets.artifact import WrittenArtifact
from bitplan.targets.exports.gguf_file import IMATRIX_FILE
from bitplan.targets.manifest import RunRecord

SIDECARS = (IMATRIX_FILE,)  # files a target writes beside what the runtime loads (not in file_bytes)


@dataclass
class RunResult:
    """The report of one run; ``to_json`` is the CLI's JSON contract."""

    artifact: str
    bits_per_weight: float
    bytes: int
    status: str
    objective: float | None
    lower_bound: float | None
    units: list[dict[str, Any]]
    model: str
    metric: str | None
    budget: dict[str, Any]
    calibration: dict[str, Any] | None
    manifest_sha256: str
    timings_s: dict[str, float]
    predicted_bytes: int
    warnings: list[str]
    kl_divergence: float | None = None  # mean per-token KL(float || quantized) on calibration windows (nats)
    quality: dict[str, Any] | None = None  # bitplan.report.quality.QualityReport on held-back windows (language models)
    file_bits_per_parameter: float | None = None  # the whole artifact folder per parameter of the model
    target: str = "bitplan"
    files: list[dict[str, Any]] | None = None  # what the target runs from: name (under artifact), bytes, sha256
    file_bytes: int | None = None  # bytes of the target's file(s): the GGUF file, or the whole packed folder
    latency: dict[str, Any] | None = None  # predicted (and measured) decode ms per token, the table used
    head: list[dict[str, Any]] | None = None  # the output head's (and an untied token embedding's) format and bytes,
    # when a whole-file budget chose them
    bytes_by_kind: dict[str, int] | None = None  # the written file's bytes by kind of tensor (bitplan.report.kinds)
    experts: dict[str, Any] | None = None  # a MoE model's routing on the calibration windows (bitplan.sources.moe)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measured:
    """What steps 3-4 give: the calibration record and tokens, and the sensitivities (``None`` when uniform)."""

    calibration: dict[str, Any] | None
    tokens: torch.Tensor | None
    sensitivity: SensitivityResult | None
    heldout: tuple[torch.Tensor, str] | None = None  # held-back windows for the quality report, and their text
    importance: Importance | None = None  # per-column input energy (formats' encoders), when the job has formats
    routing: RoutingReport | None = None  # a MoE model's tokens per expert on the calibration windows


def result_of(spec: JobSpec, written: WrittenArtifact, plan: Plan, record: RunRecord, timings: dict[str, float],
            kl: float | None, quantized: Quantized, files: list[dict[str, Any]],
            latency: dict[str, Any] | None = None, head: tuple[str, ...] = ()) -> RunResult:
    """The run's report from what was written: sizes and bits per weight of the block layers (the head's apart),
    checked against the size model's prediction."""
    predicted = sum(encoded_bytes(quantized[name]) for name in plan.bits)
    if predicted != written.quantized_bytes:
        raise RuntimeError(f"size model drifted: predicted {predicted} bytes, wrote {written.quantized_bytes}")
    stored = {u.name: u for u in written.manifest.units}
    linear = [name for name in plan.bits if name not in head]  # bytes and bits per weight: the block layers'
    linear_bytes = sum(stored[name].bytes for name in linear)
    linear_numel = sum(stored[name].in_features * stored[name].out_features for name in linear)
    return RunResult(
        artifact=str(written.path), bits_per_weight=8 * linear_bytes / linear_numel, bytes=linear_bytes,
        status=plan.solver.status, objective=plan.solver.objective, lower_bound=plan.solver.lower_bound,
        units=[_unit_json(n, plan.bits[n], quantized[n], unit_format(spec, plan, n)) for n in linear],
        head=[{**_unit_json(n, plan.bits[n], quantized[n], unit_format(spec, plan, n)), "bytes": stored[n].bytes}
              for n in head] or None,
        model=spec.model, metric=record.sensitivity.metric, budget=record.budget, calibration=record.calibration,
        manifest_sha256=written.manifest_sha256, timings_s=timings,
        warnings=record.sensitivity.warnings, kl_divergence=kl, quality=record.quality,
        file_bits_per_parameter=written.manifest.achieved.file_bits_per_parameter,
        target=spec.quantization.target.value, files=files,
        file_bytes=sum(f["bytes"] for f in files if f["name"] not in SIDECARS),
        latency=latency, predicted_bytes=predicted - sum(stored[name].bytes for name in head))


def unit_format(spec: JobSpec, plan: Plan, name: str) -> str:
    """The format a unit was stored in: the plan's choice, or the integer grid of its width and group size."""
    if plan.formats is not None:
        return plan.formats[name]
    symmetric = "-sym" if spec.quantization.quantizer.value == "rtn-symmetric" else ""
    return f"int{plan.bits[name]}-g{spec.quantization.group_size}{symmetric}"


def _unit_json(name: str, bits: int, encoded: Any, fmt: str) -> dict[str, Any]:
    """One entry of the result's ``units``: its format, bits and group size (GGML types: none, blocks are fixed)."""
    if isinstance(encoded, GgmlWeight):
        return {"name": name, "bits": bits, "format": fmt}
    mixed = {} if encoded.group_bits is None else {"group_bits": list(encoded.group_bits)}
    return {"name": name, "bits": bits, "group_size": encoded.group_size, "format": fmt, **mixed}
