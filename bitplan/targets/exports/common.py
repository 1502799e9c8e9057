"""What every export shares: reading an artifact's quantized units back, and the report of an export."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bitplan.errors import BitplanError
from bitplan.hashing import sha256_file
from bitplan.kernels.quant_linear import QuantLinear
from bitplan.quantizer.formats import GgmlWeight, scale_bits_of
from bitplan.quantizer.rtn import QuantizedWeight
from bitplan.targets.artifact import FLOAT_FILE, QUANTIZED_FILE
from bitplan.targets.manifest import GGML_LAYOUT, Manifest, read_manifest

ExportFn = Callable[..., "ExportReport"]  # (artifact, out, **options) -> report
EXPORTERS: dict[str, ExportFn] = {}  # format name -> writer, filled by register_export in each module


def register_export(name: str) -> Callable[[ExportFn], ExportFn]:
    """Register ``function(artifact, out) -> ExportReport`` as the writer of export format ``name``."""

    def register(function: ExportFn) -> ExportFn:
        EXPORTERS[name] = function
        return function

    return register


@dataclass
class ExportReport:
    """What an export wrote and what it weighs; ``to_json`` is ``bitplan export --json``'s contract.

    ``predicted_bytes`` is computed from the chosen types before writing; ``bytes`` is measured from the
    written files (tensor data only, as the artifact's ``achieved.bytes`` counts); the two must agree.
    """

    format: str
    path: str
    bytes: int
    predicted_bytes: int
    file_bytes: int
    sha256: dict[str, str]
    artifact_bytes: int
    units: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inexact: list[dict[str, Any]] = field(default_factory=list)  # units no type of the format held exactly

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_artifact_units(path: Path
                        ) -> tuple[Manifest, dict[str, QuantizedWeight | GgmlWeight], dict[str, torch.Tensor]]:
    """The manifest (checked against its sha256s), every quantized unit unpacked (name -> codes, scales and
    zeros in the original column order; a unit in a GGML type as its blocks), and the float tensors (tied
    aliases included).

    A unit with mixed widths inside comes back at its widest width (``group_bits`` ``None``): its narrower codes
    are valid codes of that width, which is how the exports write it."""
    manifest = read_manifest(path)
    packed = load_file(str(path / QUANTIZED_FILE))
    units: dict[str, QuantizedWeight | GgmlWeight] = {}
    for unit in manifest.units:
        if unit.layout == GGML_LAYOUT:
            units[unit.name] = GgmlWeight(str(unit.format), packed[f"{unit.name}.ggml"].numpy(),
                                          (unit.out_features, unit.in_features))
            continue
        layer = QuantLinear(unit.in_features, unit.out_features, bits=unit.bits, group_size=unit.group_size,
                            bias=False, group_bits=unit.group_bits, scale_bits=scale_bits_of(unit.format))
        layer.load_state_dict({key: packed[f"{unit.name}.{key}"] for key in layer.state_dict()})
        codes, scales, zeros = layer.codes_scales_zeros()
        units[unit.name] = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=layer.bits,
                                           group_size=unit.group_size)
    floats = load_file(str(path / FLOAT_FILE))
    for alias, stored in manifest.tied.items():
        floats[alias] = floats[stored]
    return manifest, units, floats


def export_artifact(artifact: Path, *, format: str, out: Path, inexact: str | None = None) -> ExportReport:
    """Export the artifact at ``artifact`` to ``out`` in ``format`` (a name in :data:`EXPORTERS`); ``inexact``
    (gguf): what to do with units the format cannot hold exactly at their size (refuse, reencode, exact)."""
    if format not in EXPORTERS:
        raise BitplanError(f"unknown export format {format!r}; choose one of {', '.join(EXPORTERS)}",
                           param="format")
    if inexact is not None and format != "gguf":
        raise BitplanError(f"--inexact is for the gguf export; {format} refuses what it cannot hold exactly",
                           param="inexact")
    report = EXPORTERS[format](artifact, out, **({} if inexact is None else {"inexact": inexact}))
    if report.bytes != report.predicted_bytes:
        raise RuntimeError(f"{format} export size drifted: predicted {report.predicted_bytes} bytes, "
                           f"wrote {report.bytes}")
    return report


def file_hashes(paths: list[Path]) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in paths}
