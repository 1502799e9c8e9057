"""The job specification: one versioned, nested, frozen description of a job, and the single source of its
defaults, rules and help texts.

A job is a model reference plus six parts (:class:`Budget`, :class:`Calibration`, :class:`SensitivityOptions`,
:class:`Allocation`, :class:`Quantization`, :class:`Refinement`, defined in :mod:`bitplan.spec_parts` and
re-exported here). Every leaf field carries an :class:`Option` in its metadata: its flat name (the HTTP field and
the keyword of :meth:`JobSpec.from_flat`), its command-line flag, its bounds and its help. The CLI
(``bitplan.cli.add_spec_arguments``) and the HTTP schema (``bitplan.service.schemas.JobCreate``) are generated from
:data:`OPTIONS`; a new option is one field of a part.

Each part checks itself in ``__post_init__`` and :class:`JobSpec` checks what spans parts, so a Python caller,
the CLI and the API get the same :class:`SpecError` (with the offending ``param``) before any heavy work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any

from bitplan.errors import SpecError
from bitplan.job.budget_range import bpw_range, check_bpw_budgets
from bitplan.options import Option
from bitplan.quantizer.formats import FORMATS
from bitplan.sensitivity.request import HutchinsonConfig
from bitplan.spec_parts import (
    PARTS,
    TARGET_LEGAL,
    TARGETS,
    Allocation,
    Budget,
    Calibration,
    ComputeDtypeChoice,
    DeviceChoice,
    EncoderChoice,
    MetricChoice,
    PrecisionChoice,
    Quantization,
    QuantizerChoice,
    Refinement,
    SensitivityOptions,
    SizePresetChoice,
    SolverChoice,
    TargetChoice,
)

__all__ = [  # the parts and their choices live in bitplan.spec_parts; this module is where callers read them
    "MODEL_OPTION", "OPTIONS", "PACKED_DEFAULT_FORMATS", "PARTS", "SPEC_VERSION", "TARGETS", "TARGET_LEGAL",
    "Allocation", "Budget", "Calibration", "ComputeDtypeChoice", "DeviceChoice", "EncoderChoice", "JobSpec",
    "MetricChoice", "Option", "PrecisionChoice", "Quantization", "QuantizerChoice", "Refinement",
    "SensitivityOptions", "SizePresetChoice", "SolverChoice", "TargetChoice", "parse_pin",
]

SPEC_VERSION = 1

# The packed target's default set for a job that asks for nothing it cannot do (:meth:`JobSpec.default_formats`):
# measured best on WikiText-2 (bench/results/pipeline-smollm2-bitplan-mix-double-quantized-2026-12-06.json)
PACKED_DEFAULT_FORMATS = "bitplan-mix"


MODEL_OPTION = Option(kind="str", help="bundled id, HF folder, .safetensors or .gguf file", flag="--model",
                      name="model", part="", field="model")


def _collect() -> tuple[Option, ...]:
    """Every option of the spec, with its flat name, part and default filled in."""
    options = [MODEL_OPTION]
    for part_name, part in PARTS.items():
        for f in fields(part):
            option = f.metadata.get("option")
            if option is not None:
                options.append(dataclasses.replace(option, name=option.name or f.name, part=part_name,
                                                   field=f.name, default=f.default))
    names = [o.name for o in options]
    if len(names) != len(set(names)):
        raise RuntimeError(f"two spec fields share a flat name: {names}")
    return tuple(options)


@dataclass(frozen=True)
class JobSpec:
    """One job: a model reference and how to plan, quantize and check it. Frozen; checked on construction."""

    model: str
    budget: Budget
    calibration: Calibration = field(default_factory=Calibration)
    sensitivity: SensitivityOptions = field(default_factory=SensitivityOptions)
    allocation: Allocation = field(default_factory=Allocation)
    quantization: Quantization = field(default_factory=Quantization)
    refinement: Refinement = field(default_factory=Refinement)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model or "\x00" in self.model:
            raise SpecError("model needs a non-empty reference without NUL bytes", param="model")
        if self.version != SPEC_VERSION:
            raise SpecError(f"job spec version {self.version} is not supported (this bitplan reads version "
                            f"{SPEC_VERSION})", param="version")
        if self.default_formats():
            object.__setattr__(self, "quantization",
                               dataclasses.replace(self.quantization, formats=PACKED_DEFAULT_FORMATS))
        self._check_widths()
        self._check_refinement()
        if self.budget.file_bytes is not None and self.quantization.target.value != "gguf":
            raise SpecError("a whole-file budget (--file-bytes) is for the gguf target's one file: add --target gguf, "
                            "or give --bytes for the quantized layers", param="file_bytes")
        if self.budget.size_of is not None and self.quantization.target.value != "gguf":
            raise SpecError("a named size (--size-of) is the bytes of a llama.cpp GGUF file: add --target gguf",
                            param="size_of")
        if self.budget.has_time_budget and self.quantization.target.value != "gguf":
            raise SpecError("latency budgets are measured for the gguf target on this CPU (llama.cpp through "
                            "llama-cpp-python): add --target gguf (the packed target's kernels need a GPU to time)",
                            param=self.budget.time_param)
        reach = bpw_range(self.allocation.candidate_bits, self.quantization.group_size,
                          self.quantization.format_names, self.quantization.formats)
        check_bpw_budgets(self.budget.bits_per_weight, self.budget.describe, reach)

    def default_formats(self) -> bool:
        """Whether this job, which names no formats, takes the packed target's default set
        (:data:`PACKED_DEFAULT_FORMATS`, written into the spec so that its record says what ran): a budgeted
        packed job under the default quantizer, widths and group size, without --mix-groups or KL refinement.
        Anything else keeps the widths (``bitplan-default``), the one option set those features work on."""
        defaults = {o.name: o.default for o in OPTIONS}
        return (self.quantization.formats is None and self.quantization.target.value == "bitplan"
                and self.budget.uniform_bits is None and not self.quantization.mix_groups
                and not self.refinement.kl_refine_windows
                and self.quantization.quantizer == defaults["quantizer"]
                and self.allocation.candidate_bits == defaults["candidate_bits"]
                and self.quantization.group_size == defaults["group_size"])

    def _check_formats(self) -> None:
        names = self.quantization.format_names
        if names is None:
            return
        if self.budget.uniform_bits is not None:
            if self.quantization.target.value != "bitplan":
                raise SpecError(f"the {self.quantization.target.value} target chooses a format per layer under a "
                                f"budget: give --bpw or --bytes (uniform GGUF baselines are llama.cpp's own "
                                f"presets, bench/peers.py)", param="uniform_bits")
            raise SpecError("--formats chooses a format per layer under a budget; a uniform baseline takes "
                            "--uniform-bits with --group-size", param="formats")
        if self.refinement.kl_refine_windows:
            raise SpecError("KL refinement re-solves bit widths; it does not yet combine with --formats",
                            param="kl_refine_windows")
        nominal = sorted({FORMATS[n].nominal_bits for n in names})
        for pattern, bits in self.allocation.pinned:
            if bits not in nominal:
                raise SpecError(f"pin {pattern}={bits}: no candidate format has {bits} bits (the formats have "
                                f"{nominal})", param="pinned")

    def _check_widths(self) -> None:
        if self.quantization.format_names is not None:
            self._check_formats()
            return
        widths = self.widths
        for pattern, bits in self.allocation.pinned:
            if bits not in widths:
                raise SpecError(f"pin {pattern}={bits}: {bits} bits is not a candidate width {list(widths)}",
                                param="pinned")

    def _check_refinement(self) -> None:
        windows = self.refinement.kl_refine_windows
        if windows and self.calibration.num_samples < 2 * windows:
            raise SpecError(f"KL refinement on {windows} windows needs at least {2 * windows} calibration "
                            f"samples (num_samples), got {self.calibration.num_samples}", param="kl_refine_windows")
        if windows and self.budget.uniform_bits is not None:
            raise SpecError("KL refinement re-solves an allocation; uniform bits have none to re-solve",
                            param="kl_refine_windows")

    @property
    def widths(self) -> tuple[int, ...]:
        """The bit widths a layer may take: the uniform width alone, or the sorted candidates."""
        if self.budget.uniform_bits is not None:
            return (self.budget.uniform_bits,)
        return tuple(sorted(set(self.allocation.candidate_bits)))

    @property
    def budgets(self) -> int:
        """How many artifacts the job writes (one per bits-per-weight budget, else one)."""
        return max(len(self.budget.bits_per_weight), 1)

    def replace(self, **flat: Any) -> JobSpec:
        """A copy with some options changed, by flat name (``spec.replace(num_samples=8)``)."""
        return JobSpec.from_flat(**{**self.to_flat(), **flat})

    @classmethod
    def from_flat(cls, **values: Any) -> JobSpec:
        """Build a spec from flat option names (the HTTP fields, the CLI's destinations); unknown names are an
        error. ``bits_per_weight`` takes a number or a list; ``pinned`` takes pairs or 'PATTERN=BITS' strings."""
        by_name = {o.name: o for o in OPTIONS}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise SpecError(f"unknown job option {unknown[0]!r}; known: {', '.join(sorted(by_name))}",
                            param=unknown[0])
        parts: dict[str, dict[str, Any]] = {name: {} for name in PARTS}
        for name, value in values.items():
            option = by_name[name]
            if option.part:
                parts[option.part][option.field] = _flat_value(option, value)
        if "model" not in values:
            raise SpecError("model is required", param="model")
        return cls(model=values["model"], **{name: PARTS[name](**kw) for name, kw in parts.items()})

    def to_flat(self) -> dict[str, Any]:
        """Every option by flat name (the inverse of :meth:`from_flat`)."""
        flat = {"model": self.model}
        for option in OPTIONS[1:]:
            flat[option.name] = getattr(getattr(self, option.part), option.field)
        return flat

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able nested dict with the spec version (what a job record and the manifest store)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Read back :meth:`to_dict`'s output, or an older record's: a field it predates takes its default."""
        _known_keys(data, cls, "job spec", required={"version"})  # an unknown field is an error, never dropped
        parts = {}
        for name, part in PARTS.items():  # a job queued before an upgrade runs after it, as it was asked
            values = _known_keys(dict(data.get(name, {})), part, f"job spec part {name!r}")
            if "hutchinson" in values:  # the sensitivity part's
                values["hutchinson"] = HutchinsonConfig(**_known_keys(dict(values["hutchinson"]), HutchinsonConfig,
                                                                      "hutchinson settings"))
            if "pinned" in values:  # the allocation part's
                values["pinned"] = tuple(tuple(p) for p in values["pinned"])
            parts[name] = part(**values)
        return cls(model=data["model"], version=data["version"], **parts)


def _flat_value(option: Option, value: Any) -> Any:
    if option.kind == "floats" and value is not None and not isinstance(value, (list, tuple)):
        return (value,)
    if option.kind == "floats" and value is None:
        return ()
    if option.kind == "pins":
        return tuple(parse_pin(v) if isinstance(v, str) else tuple(v) for v in value)
    return value


def parse_pin(text: str) -> tuple[str, int]:
    """'PATTERN=BITS' -> (PATTERN, BITS)."""
    pattern, _, bits = text.rpartition("=")
    try:
        return pattern, int(bits)
    except ValueError:
        raise SpecError(f"pinned takes PATTERN=BITS such as 'model.layers.0.*=8', got {text!r}",
                        param="pinned") from None


def _known_keys(data: dict[str, Any], of: type, what: str, *, required: set[str] | None = None) -> dict[str, Any]:
    needed = {f.name for f in fields(of) if f.default is MISSING and f.default_factory is MISSING} | (required or set())
    missing, unknown = sorted(needed - set(data)), sorted(set(data) - {f.name for f in fields(of)})
    if missing or unknown:
        raise SpecError(f"{what}: missing fields {missing}, unknown fields {unknown}", param=what)
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


OPTIONS: tuple[Option, ...] = _collect()
