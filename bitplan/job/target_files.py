"""The files a target runs from, written beside the packed artifact (step 8 of
:func:`bitplan.job.pipeline.run_budgets`): the GGUF with its importance matrix, the compressed-tensors files, or
the packed folder's own; each added to the manifest's checked files. And the written GGUF's measured decode time."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from bitplan.errors import BudgetError
from bitplan.hashing import sha256_file
from bitplan.job.run_result import Measured
from bitplan.spec import JobSpec
from bitplan.targets.artifact import WrittenArtifact
from bitplan.targets.exports.gguf_file import IMATRIX_FILE
from bitplan.targets.manifest import MANIFEST, write_manifest

GGUF_FILE = "model.gguf"  # the gguf target's file, beside the manifest


def measure_latency(gguf: Path, report: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The written GGUF's decode time through llama.cpp on this machine (median of interleaved rounds), added to
    the latency report; and the seconds it took."""
    from bitplan.report.latency import time_files

    started = time.perf_counter()
    (timed,) = time_files([gguf], rounds=3)
    return {**report, "measured_ms_per_token": timed["decode_ms"],
            "measured_prefill_ms_per_token": timed["prefill_ms"]}, round(time.perf_counter() - started, 3)


def write_target(spec: JobSpec, written: WrittenArtifact, measured: Measured | None = None
                 ) -> tuple[list[dict[str, Any]], WrittenArtifact]:
    """The file(s) the target runs from: for ``gguf``, ``model.gguf`` written beside the manifest (each unit's
    GGML blocks copied byte for byte; its block-linear bytes must be the artifact's) with the importance matrix
    its encoders used (``model.imatrix.gguf``, llama.cpp's format: ``llama-quantize --imatrix`` re-quantizes the
    file the way we did), both added to the manifest's checked files, so the service serves them; for
    ``bitplan``, the folder's files. One ``{"name", "bytes", "sha256"}`` row each, and the artifact as it now
    is."""
    folder = written.path
    if spec.quantization.target.value == "gguf":
        from bitplan.targets.exports import export_artifact

        report = export_artifact(folder, format="gguf", out=folder / GGUF_FILE)
        linear = sum(row["bytes"] for row in report.units)
        if linear != written.quantized_bytes:
            raise RuntimeError(f"the GGUF holds {linear} bytes of block weights, the artifact "
                               f"{written.quantized_bytes}")
        limit = spec.budget.file_bytes
        if limit is not None and report.file_bytes > limit:
            raise BudgetError(f"the written GGUF has {report.file_bytes} bytes, over the whole-file budget of "
                              f"{limit}; lower it by {report.file_bytes - limit} bytes", param="file_bytes")
        if measured is None or measured.importance is None or measured.tokens is None:
            return listed(written, [GGUF_FILE])
        from bitplan.targets.exports.gguf_file import source_model, write_imatrix

        write_imatrix(folder / IMATRIX_FILE, source_model(written.manifest), measured.importance,
                      tokens=int(measured.tokens.numel()), chunk_size=int(measured.tokens.shape[-1]),
                      dataset=str((measured.calibration or {}).get("source", "calibration")),
                      unit_tokens=None if measured.routing is None else measured.routing.unit_tokens(
                          measured.importance))
        return listed(written, [GGUF_FILE, IMATRIX_FILE])
    if spec.quantization.target.value == "compressed-tensors":
        return _write_compressed_tensors(written)
    files = {**written.manifest.files, MANIFEST: written.manifest_sha256}
    return [{"name": name, "bytes": (folder / name).stat().st_size, "sha256": digest}
            for name, digest in sorted(files.items())], written


def _write_compressed_tensors(written: WrittenArtifact) -> tuple[list[dict[str, Any]], WrittenArtifact]:
    """The compressed-tensors target: ``model.safetensors`` and a ``config.json`` with its
    ``quantization_config`` in the artifact folder itself, so ``from_pretrained(OUT)`` loads it (our loader
    ignores that config entry); both are listed in the manifest. The target's formats divide every layer's
    input width, so nothing is regrouped; its symmetric grids store no zero points, so its layers weigh a little
    less than the artifact's (which keeps an fp16 zero per group)."""
    from bitplan.targets.exports import export_artifact

    folder = written.path
    staging = folder.with_name(f".{folder.name}.compressed-tensors-{uuid.uuid4().hex[:8]}")
    try:
        export_artifact(folder, format="compressed-tensors", out=staging)
        names = ("model.safetensors", "config.json")
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return listed(written, list(names))


def listed(written: WrittenArtifact, names: list[str]) -> tuple[list[dict[str, Any]], WrittenArtifact]:
    """Add the target's files ``names`` (in the artifact folder) to the manifest's checked files, rewrite it,
    and return their ``{"name", "bytes", "sha256"}`` rows with the artifact as it now is."""
    folder = written.path
    rows = [{"name": name, "bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in names]
    manifest = dataclasses.replace(written.manifest,
                                   files={**written.manifest.files, **{r["name"]: r["sha256"] for r in rows}})
    return rows, dataclasses.replace(written, manifest=manifest, manifest_sha256=write_manifest(folder, manifest))
