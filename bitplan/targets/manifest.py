"""The artifact's manifest as a typed, versioned record: the only module that writes ``manifest.json`` or reads
it back. Everything else uses :class:`Manifest`'s attributes.

On disk (format version 3; a unit's ``format`` and the ``ggml-blocks`` layout since 3): ``format_version``,
``packing``, ``model_kind``, ``units`` (one record per layer),
``tied`` (alias -> stored tensor), ``achieved`` (sizes measured from the written files), the run's record
(``source``, ``budget``, ``group_size``, ``candidate_bits``, ``tie_fused``, ``pinned``, ``solver``,
``sensitivity``, ``calibration``, ``quantizer``, ``mix_groups``, ``kl_refinement``, ``job``: the job spec) and
``files`` (the sha256 of every other file). Version 1 artifacts still read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bitplan.errors import ArtifactError
from bitplan.hashing import sha256_file

FORMAT_VERSION = 5  # 5: the guard placeholder (bitplan.targets.artifact.GUARD_FILE)
READABLE_VERSIONS = (1, 2, 3, 4, 5)
PACKING_FORMAT = "bitstream-int32"
MIXED_LAYOUT = "segments-by-width"
GGML_LAYOUT = "ggml-blocks"  # since version 3: the unit's weight is one uint8 tensor of GGML blocks
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class UnitRecord:
    """One quantized layer: its width, group size, shape, tensors and stored bytes."""

    name: str
    bits: int
    group_size: int
    in_features: int
    out_features: int
    bias: bool
    tensors: list[str]
    bytes: int = 0
    group_bits: list[int] | None = None  # mixed widths inside the layer (``layout``: segments-by-width)
    layout: str | None = None
    format: str | None = None  # since version 3: the format's name (``int4-g128``, ``Q4_K``; formats issue)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("group_bits", "layout", "format")}


@dataclass(frozen=True)
class Achieved:
    """Sizes measured from the written files."""

    bytes: int
    numel: int
    bits_per_weight: float
    file_bytes: int
    parameters: int | None = None  # every parameter of the model (since 0.1: absent in older manifests)
    file_bits_per_parameter: float | None = None  # the whole folder's bytes * 8 / parameters


@dataclass(frozen=True)
class SourceRecord:
    """The model the artifact was made from."""

    reference: str
    format: str
    sha256: str


@dataclass(frozen=True)
class SolverRecord:
    """How the allocation was found: solver, status (``uniform``: no solve) and certificate."""

    name: str | None
    status: str
    objective: float | None
    lower_bound: float | None
    solve_s: float | None


@dataclass(frozen=True)
class SensitivityRecord:
    """The metric that predicted the loss increases (``None`` for a uniform plan) and its warnings."""

    metric: str | None
    warnings: list[str]


@dataclass(frozen=True)
class RunRecord:
    """What the pipeline says of how the artifact was made. ``budget`` is ``{"bits_per_weight", "bytes"}`` or
    ``{"uniform_bits"}``; ``calibration``, ``kl_refinement`` and ``quality`` are their reports; ``job`` is the
    job spec's ``to_dict()``."""

    source: SourceRecord
    budget: dict[str, Any]
    group_size: int
    candidate_bits: list[int]
    solver: SolverRecord
    sensitivity: SensitivityRecord
    calibration: dict[str, Any] | None
    quantizer: str
    mix_groups: bool
    tie_fused: bool = False
    pinned: list[list[Any]] = field(default_factory=list)
    kl_refinement: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None  # bitplan.report.quality.QualityReport on held-back windows
    job: dict[str, Any] | None = None
    formats: list[str] | None = None  # the candidate formats, when the job chose among formats
    latency: dict[str, Any] | None = None  # a latency budget's report: predicted ms per token, the table used

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("calibration",)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        return cls(**{**data, "source": SourceRecord(**data["source"]), "solver": SolverRecord(**data["solver"]),
                      "sensitivity": SensitivityRecord(**data["sensitivity"])})


@dataclass(frozen=True)
class Manifest:
    """The whole manifest."""

    format_version: int
    packing: str
    model_kind: str
    units: list[UnitRecord]
    tied: dict[str, str]
    achieved: Achieved
    run: RunRecord | None
    files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "packing": self.packing, "model_kind": self.model_kind,
                "units": [u.to_dict() for u in self.units], "tied": self.tied, "achieved": asdict(self.achieved),
                **({} if self.run is None else self.run.to_dict()), "files": self.files}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        run_keys = {f.name for f in fields(RunRecord)}
        run_data = {k: v for k, v in data.items() if k in run_keys}
        try:
            return cls(format_version=data["format_version"], packing=data["packing"],
                       model_kind=data["model_kind"], units=[UnitRecord(**u) for u in data["units"]],
                       tied=dict(data["tied"]), achieved=Achieved(**data["achieved"]),
                       run=RunRecord.from_dict(run_data) if "source" in run_data else None,
                       files=dict(data["files"]))
        except (KeyError, TypeError) as error:
            raise ArtifactError(f"the artifact's manifest is malformed: {error}") from None


def write_manifest(folder: Path, manifest: Manifest) -> str:
    """Write ``folder/manifest.json`` (keys in a fixed order) and return its sha256."""
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return sha256_file(folder / MANIFEST)


def read_manifest(path: Path | str, *, verify: bool = True) -> Manifest:
    """Read ``manifest.json`` and, with ``verify``, check every listed file against its sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a bitplan artifact: {MANIFEST} is missing")
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format_version") not in READABLE_VERSIONS:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ArtifactError(f"artifact format version {version} is not supported "
                            f"(this bitplan reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    manifest = Manifest.from_dict(data)
    if verify:
        for name, expected in manifest.files.items():
            file = path / name
            if not file.is_file() or sha256_file(file) != expected:
                raise ArtifactError(f"artifact file {file} is missing or fails its sha256 check")
    return manifest
