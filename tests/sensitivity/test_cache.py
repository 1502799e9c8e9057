"""The sensitivity cache: a second run with the same model, calibration and metric measures nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import bitplan.job.pipeline as pipeline
import bitplan.job.sensitivity_pass as sensitivity_pass
from bitplan.sensitivity.cache import SensitivityCache, cache_key
from bitplan.spec import JobSpec

SMALL = {"num_samples": 2, "seq_len": 32, "group_size": 64}


def test_second_run_reuses_the_cache_and_a_change_misses_it(tiny_llama_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = sensitivity_pass.compute_sensitivity
    monkeypatch.setattr(sensitivity_pass, "compute_sensitivity", lambda *a, **k: calls.append(1) or original(*a, **k))
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, **SMALL)
    first = pipeline.run_pipeline(spec, out=tmp_path / "a")
    second = pipeline.run_pipeline(spec, out=tmp_path / "b")
    assert len(calls) == 1
    assert first.units == second.units and first.objective == second.objective
    pipeline.run_pipeline(spec.replace(seed=1), out=tmp_path / "c")  # new tokens
    pipeline.run_pipeline(spec.replace(metric="output_error"), out=tmp_path / "d")
    pipeline.run_pipeline(spec, out=tmp_path / "e", use_cache=False)
    assert len(calls) == 4


def test_damaged_entry_is_ignored(tmp_path: Path) -> None:
    cache = SensitivityCache(tmp_path)
    key = cache_key(model="m", metric="x")
    cache.folder.mkdir(parents=True)
    cache.path(key).write_text("{not json")
    assert cache.get(key) is None
    assert cache_key(model="m", metric="x") == key != cache_key(model="m", metric="y")


@pytest.mark.parametrize("metric, after", [("fisher_output_error", 1), ("fisher_output_error", 3),
                                           ("hutchinson", 2)])
def test_cancellation_stops_between_steps_and_writes_nothing(tiny_llama_dir: Path, tmp_path: Path, metric: str,
                                                             after: int) -> None:
    from bitplan.sensitivity import Cancelled

    checks = []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) > after

    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, metric=metric, **SMALL)
    with pytest.raises(Cancelled):
        pipeline.run_pipeline(spec, out=tmp_path / "out", should_stop=should_stop)
    assert not (tmp_path / "out").exists()
    assert len(checks) == after + 1


def test_issue13_every_metric_is_registered_once() -> None:
    from bitplan.sensitivity import Metric
    from bitplan.sensitivity.registry import METRICS

    assert set(METRICS) == {m.value for m in Metric}


class FolderMirror:
    """A :class:`CacheMirror` kept in a folder (as the service's object store keeps it under ``cache/``)."""

    where = "the shared folder"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.published: list[str] = []

    def fetch(self, name: str, dest: Path) -> bool:
        source = self.root / name
        if not source.is_file():
            return False
        dest.write_bytes(source.read_bytes())
        return True

    def publish(self, name: str, path: Path) -> None:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        (self.root / name).write_bytes(path.read_bytes())
        self.published.append(name)


def test_issue44_a_second_machine_takes_the_sensitivity_and_statistics_from_the_mirror(
        tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two machines, each with its own cache folder, share a mirror: the second measures nothing (no sensitivity
    pass, no calibration forward for the encoders' importance), says where its sensitivity came from, and writes
    the same plan as the first."""
    calls: list[str] = []
    original = sensitivity_pass.compute_sensitivity
    monkeypatch.setattr(sensitivity_pass, "compute_sensitivity",
                        lambda *a, **k: calls.append("sensitivity") or original(*a, **k))
    mirror = FolderMirror(tmp_path / "shared")
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=5.0, formats="Q4_0,Q8_0", num_samples=2,
                             seq_len=32)
    [first] = pipeline.run_budgets(spec, out_dirs=[tmp_path / "a"], cache_dir=tmp_path / "host-a",
                                   cache_mirror=mirror)
    assert calls == ["sensitivity"] and first.calibration["sensitivity_cache"] == "miss"
    assert sorted(name.partition("/")[0] for name in mirror.published) == ["sensitivity", "statistics"]

    def no_forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second machine ran the calibration forward again")

    monkeypatch.setattr(pipeline, "input_energy", no_forward)
    [second] = pipeline.run_budgets(spec, out_dirs=[tmp_path / "b"], cache_dir=tmp_path / "host-b",
                                    cache_mirror=mirror)
    assert calls == ["sensitivity"]
    assert second.calibration["sensitivity_cache"] == "hit"
    assert second.calibration["sensitivity_cache_from"] == "the shared folder"
    assert second.units == first.units
    assert (tmp_path / "b" / "quantized.safetensors").read_bytes() == (tmp_path / "a" / "quantized.safetensors"
                                                                        ).read_bytes()
    [third] = pipeline.run_budgets(spec, out_dirs=[tmp_path / "c"], cache_dir=tmp_path / "host-b",
                                   cache_mirror=mirror)  # now kept on host b too
    assert third.calibration["sensitivity_cache_from"] == "this machine"
