"""The job spec (issue 13): one source of defaults, rules and messages for Python, the CLI and the HTTP API."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from bitplan.cli import build_parser
from bitplan.errors import SpecError
from bitplan.service.schemas import JobCreate
from bitplan.spec import OPTIONS, SPEC_VERSION, JobSpec
from bitplan.stages import STAGE_SPAN, Stage, overall_fraction


def test_issue13_cli_flags_and_http_fields_come_from_the_spec() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {flag for action in run._actions for flag in action.option_strings}
    assert {o.flag for o in OPTIONS if o.flag} <= flags
    assert set(JobCreate.model_fields) == {o.name for o in OPTIONS if o.http}
    for option in OPTIONS:
        if option.http and option.name != "model":
            default = JobCreate.model_fields[option.name].default
            expected = getattr(option.default, "value", option.default)
            assert default == (list(expected) if isinstance(expected, tuple) and expected else expected or default)


def test_issue13_spec_round_trips_and_reading_back_is_strict() -> None:
    spec = JobSpec.from_flat(model="m", bits_per_weight=[3, 3.5], pinned=["*.down_proj=8"], solver="highs", seed=7)
    data = spec.to_dict()
    assert data["version"] == SPEC_VERSION and JobSpec.from_dict(data) == spec
    assert spec.allocation.pinned == (("*.down_proj", 8),) and spec.budgets == 2
    with pytest.raises(SpecError, match="unknown fields \\['surprise'\\]"):
        JobSpec.from_dict({**data, "surprise": 1})
    with pytest.raises(SpecError, match="job spec part 'quantization': missing fields \\[\\], unknown fields "
                                        "\\['surprise'\\]"):
        JobSpec.from_dict({**data, "quantization": {**data["quantization"], "surprise": 1}})
    with pytest.raises(SpecError, match="hutchinson settings: missing fields \\[\\], unknown fields \\['probes'\\]"):
        JobSpec.from_dict({**data, "sensitivity": {**data["sensitivity"], "hutchinson": {"probes": 2}}})
    for required in ("model", "version"):  # no default to take: not a record this bitplan wrote
        with pytest.raises(SpecError, match=f"job spec: missing fields \\['{required}'\\]"):
            JobSpec.from_dict({k: v for k, v in data.items() if k != required})
    with pytest.raises(SpecError, match="version 99"):
        JobSpec.from_dict({**data, "version": 99})
    with pytest.raises(SpecError, match="unknown job option 'samples'"):
        JobSpec.from_flat(model="m", bits_per_weight=3.5, samples=4)


NEWER_FIELDS = ("device", "compute_dtype", "max_memory", "encoder", "size_of")  # issues 41 and 45


def without_newer_fields(data: dict, names: tuple[str, ...] = NEWER_FIELDS) -> dict:
    """A job record as a bitplan from before these options stored it."""
    where = {o.name: (o.part, o.field) for o in OPTIONS}
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for name in names:
        part, field = where[name]
        del old[part][field]
    return old


def test_issue45_a_record_stored_before_newer_options_reads_back_with_their_defaults() -> None:
    spec = JobSpec.from_flat(model="m", bits_per_weight=[3, 3.5], pinned=["*.down_proj=8"], seed=7, num_samples=4)
    old = without_newer_fields(spec.to_dict())
    assert all(field not in part for part in old.values() if isinstance(part, dict)
               for field in NEWER_FIELDS)
    assert JobSpec.from_dict(old) == spec  # every newer option at its default, the rest as stored
    without_refinement = {k: v for k, v in spec.to_dict().items() if k != "refinement"}
    assert JobSpec.from_dict(without_refinement) == spec  # a whole part the record predates: its defaults
    asked = JobSpec.from_flat(model="m", bits_per_weight=4.0, compute_dtype="bfloat16", max_memory=1 << 30)
    assert JobSpec.from_dict(asked.to_dict()).sensitivity.max_memory == 1 << 30  # a stored value wins


def test_issue13_every_part_field_is_an_option_or_a_nested_config() -> None:
    named = {(o.part, o.field) for o in OPTIONS}
    for part in ("budget", "calibration", "allocation", "quantization", "refinement"):
        for f in fields(getattr(JobSpec.from_flat(model="m", uniform_bits=4), part)):
            assert (part, f.name) in named, f"{part}.{f.name} has no option metadata"


def test_issue13_a_bad_solver_fails_before_any_work_with_one_message(tmp_path: Path) -> None:
    message = "unknown solver 'nope'; choose one of auto, highs, pulp, lagrangian, baq, cvxpy"
    with pytest.raises(SpecError, match=message) as caught:
        JobSpec.from_flat(model="does-not-exist", bits_per_weight=3.5, solver="nope")
    assert caught.value.param == "solver"
    result = subprocess.run([sys.executable, "-m", "bitplan.service.cli", "run", "--model", "does-not-exist",
                             "--bpw", "3.5", "--solver", "nope", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_issue13_every_stage_has_a_span_and_unknown_stages_are_refused() -> None:
    assert set(STAGE_SPAN) == set(Stage)
    for stage in Stage:
        low, high = stage.span
        assert 0.0 <= low <= high <= 1.0
        assert overall_fraction(stage.value, 3, 3) == pytest.approx(high)
    with pytest.raises(ValueError):
        overall_fraction("a stage nobody declared", 1, 2)


def test_issue13_the_pipeline_reports_only_declared_stages(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from bitplan.job.pipeline import run_pipeline

    seen: list[str] = []
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, num_samples=2, seq_len=32,
                             group_size=64, quantizer="gptq")
    run_pipeline(spec, out=tmp_path / "a", on_progress=lambda stage, done, total: seen.append(stage))
    assert {Stage(s) for s in seen} >= {Stage.LOAD, Stage.TOKEN_FISHER, Stage.QUANTIZE, Stage.WRITE, Stage.KL_CHECK}


def test_issue13_gptq_damp_reaches_cli_api_and_manifest(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The option added to show what a new option costs: one spec field and the line where it acts."""
    import json

    from fastapi.testclient import TestClient

    from bitplan.job.pipeline import run_pipeline
    from bitplan.service.app import ServiceSettings, create_app

    help_text = subprocess.run([sys.executable, "-m", "bitplan.service.cli", "run", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--gptq-damp" in help_text and "(default: 0.01)" in help_text
    with TestClient(create_app(ServiceSettings(data_dir=tmp_path / "svc", embedded_worker=False,
                                               model_roots=[tiny_llama_dir.parent]))) as client:
        body = {"model": str(tiny_llama_dir), "uniform_bits": 3, "quantizer": "gptq", "gptq_damp": 0.2}
        job = client.post("/v1/jobs", json=body).json()
        assert job["request"]["quantization"]["gptq_damp"] == 0.2
        refused = client.post("/v1/jobs", json={**body, "gptq_damp": 5})
        assert refused.status_code == 422 and "gptq_damp must be between 0.0001 and 1, got 5" in refused.text
    small = {"num_samples": 2, "seq_len": 32, "group_size": 64, "uniform_bits": 3, "quantizer": "gptq"}
    runs = [run_pipeline(JobSpec.from_flat(model=str(tiny_llama_dir), gptq_damp=damp, **small),
                         out=tmp_path / f"d{damp}") for damp in (0.01, 0.5)]
    manifests = [json.loads((Path(r.artifact) / "manifest.json").read_text()) for r in runs]
    assert [m["job"]["quantization"]["gptq_damp"] for m in manifests] == [0.01, 0.5]
    assert manifests[0]["files"]["quantized.safetensors"] != manifests[1]["files"]["quantized.safetensors"]


def test_issue17_whole_file_budget_rules() -> None:
    from bitplan.errors import SpecError
    from bitplan.spec import JobSpec

    spec = JobSpec.from_flat(model="smollm2-135m", file_bytes=80_000_000, target="gguf")
    assert spec.budget.describe() == "80000000 bytes of file"
    for flat, param in (({"file_bytes": 80_000_000}, "file_bytes"),
                        ({"file_bytes": 80_000_000, "bytes": 5, "target": "gguf"}, "bits_per_weight"),
                        ({"file_bytes": 0, "target": "gguf"}, "file_bytes")):
        with pytest.raises(SpecError) as refused:
            JobSpec.from_flat(model="smollm2-135m", **flat)
        assert refused.value.param == param, flat
