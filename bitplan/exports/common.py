"""What every export shares: reading an artifact's quantized units back, and the report of an export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bitplan.artifact import FLOAT_FILE, QUANTIZED_FILE, read_manifest
from bitplan.errors import BitplanError
from bitplan.hashing import sha256_file
from kernels.quant_linear import QuantLinear
from quantizer.rtn import QuantizedWeight

EXPORT_FORMATS = ("gguf", "compressed-tensors")


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_artifact_units(path: Path) -> tuple[dict[str, Any], dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """The manifest (checked against its sha256s), every quantized unit unpacked (name -> codes, scales and
    zeros in the original column order), and the float tensors (tied aliases included).

    A unit with mixed widths inside comes back at its widest width (``group_bits`` ``None``): its narrower codes
    are valid codes of that width, which is how the exports write it."""
    manifest = read_manifest(path)
    packed = load_file(str(path / QUANTIZED_FILE))
    units = {}
    for unit in manifest["units"]:
        layer = QuantLinear(unit["in_features"], unit["out_features"], bits=unit["bits"],
                            group_size=unit["group_size"], bias=False, group_bits=unit.get("group_bits"))
        layer.load_state_dict({key: packed[f"{unit['name']}.{key}"] for key in layer.state_dict()})
        codes, scales, zeros = layer.codes_scales_zeros()
        units[unit["name"]] = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=layer.bits,
                                              group_size=unit["group_size"])
    floats = load_file(str(path / FLOAT_FILE))
    for alias, stored in manifest["tied"].items():
        floats[alias] = floats[stored]
    return manifest, units, floats


def export_artifact(artifact: Path, *, format: str, out: Path) -> ExportReport:
    """Export the artifact at ``artifact`` to ``out`` in ``format`` (one of :data:`EXPORT_FORMATS`)."""
    if format == "gguf":
        from bitplan.exports.gguf_file import export_gguf

        report = export_gguf(artifact, out)
    elif format == "compressed-tensors":
        from bitplan.exports.compressed_tensors_folder import export_compressed_tensors

        report = export_compressed_tensors(artifact, out)
    else:
        raise BitplanError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if report.bytes != report.predicted_bytes:
        raise RuntimeError(f"{format} export size drifted: predicted {report.predicted_bytes} bytes, "
                           f"wrote {report.bytes}")
    return report


def file_hashes(paths: list[Path]) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in paths}
