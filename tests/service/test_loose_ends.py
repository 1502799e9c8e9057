"""Loose ends of issues 41 and 45 in the service: a streamed job over its memory cap refused at submit (422, not a
failure in the worker), job records stored before the spec's newer fields read back after an upgrade, and a
cancel during a long model load that takes effect as soon as the load returns."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bitplan.service.app import create_app
from tests.bitplan.test_spec import without_newer_fields
from tests.exports.test_gguf_hf_source import hf_folder, smollm2_tokenizer  # noqa: F401 (a fixture)
from tests.service.test_jobs import SMALL, settings_for, wait_for


def test_issue41_a_streamed_job_over_its_memory_cap_is_a_422_at_submit(
        smollm2_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from bitplan.job import streamed_job

    root = tmp_path / "models"
    root.mkdir()
    folder = hf_folder(root, smollm2_tokenizer, "llama")
    monkeypatch.setattr(streamed_job, "STREAM_ABOVE_BYTES", 0)  # as if its float32 weights were over 2 GiB
    app = create_app(settings_for(tmp_path, folder, model_roots=[root], embedded_worker=False))
    client = TestClient(app)
    body = {"model": folder.name, "bits_per_weight": 5.0, "target": "gguf", "num_samples": 2, "seq_len": 32}
    refused = client.post("/v1/jobs", json={**body, "max_memory": 64 << 20})
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert problem["param"] == "max_memory" and "it would fit with --max-memory" in problem["detail"]
    assert app.state.huey.pending_count() == 0 and client.get("/v1/jobs").json()["items"] == []
    accepted = client.post("/v1/jobs", json={**body, "max_memory": 64 << 30})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["request"]["sensitivity"]["max_memory"] == 64 << 30
    assert app.state.huey.pending_count() == 1


def test_issue45_a_job_stored_before_newer_options_survives_the_upgrade(tmp_path: Path, tiny_llama_dir: Path) -> None:
    body = {"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL}
    before = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, embedded_worker=False)))
    job_id = before.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"}).json()["id"]
    before.app.state.store.close()  # type: ignore[attr-defined]
    with sqlite3.connect(tmp_path / "data" / "jobs.db") as db:  # as a bitplan from before those options stored it
        (stored,) = db.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        old = without_newer_fields(json.loads(stored))
        db.execute("UPDATE jobs SET request = ? WHERE id = ?", (json.dumps(old), job_id))
    assert "device" in json.loads(stored)["sensitivity"] and "device" not in old["sensitivity"]
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir))) as after:
        retried = after.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})  # the client's retry
        assert retried.status_code == 202 and retried.json()["id"] == job_id, retried.text
        job = wait_for(after, job_id, {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
        assert job["request"] == old and job["allocation"][0]["bits_per_weight"] <= 4.0


SLOW_LOAD = '''
import pathlib, time, wrapt

def _slow_load(module):  # the job's child process: its model load takes until the test's file appears
    real = module.load_model

    def load_model(*args, **kwargs):
        while not pathlib.Path({release!r}).exists():
            time.sleep(0.05)
        return real(*args, **kwargs)

    module.load_model = load_model

wrapt.register_post_import_hook(_slow_load, "bitplan.job.pipeline")
'''


def test_issue45_a_job_cancelled_during_a_long_load_is_cancelled_within_5_s(
        tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks, release = tmp_path / "hooks", tmp_path / "load-may-end"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_LOAD.format(release=str(release)))
    monkeypatch.setenv("PYTHONPATH", str(hooks))  # read by the worker's spawned child only (this process started)
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir))) as client:
        job_id = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0,
                                               **SMALL}).json()["id"]
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{job_id}").json())["progress"]["stage"] != "load":
            assert time.monotonic() < deadline and job["status"] in ("queued", "running"), job
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the load, which lasts until the release file appears
        started = time.monotonic()
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
        job = wait_for(client, job_id, {"cancelled", "succeeded", "failed"}, timeout=60)
        took = time.monotonic() - started
        release.touch()
        assert job["status"] == "cancelled" and job["artifacts"] == []
        assert not list((tmp_path / "data" / "staging").glob(f"{job_id}*"))
        assert took < 5, f"cancelled {took:.1f} s after the request, the load still running"  # was 20 s and more


def test_issue45_a_cancel_that_came_during_the_load_stops_the_pipeline_before_calibration(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    from bitplan.job.pipeline import run_budgets
    from bitplan.sensitivity import Cancelled
    from bitplan.spec import JobSpec
    from bitplan.stages import Stage

    stages = []
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=4.0, **SMALL)
    with pytest.raises(Cancelled, match="cancelled during the load"):
        run_budgets(spec, out_dirs=[tmp_path / "out"], should_stop=lambda: True, use_cache=False,
                    on_progress=lambda stage, done, total: stages.append((Stage(stage).value, done, total)))
    assert stages == [("load", 0, 1), ("load", 1, 1)] and not (tmp_path / "out").exists()


def test_issue44_serve_takes_the_per_key_active_job_limit_as_a_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``bitplan serve --max-active-jobs N`` reaches the API (a fleet with many workers admits more than the
    default 4 per key); a value that is not a positive count is a command-line error (exit 2, docs/cli.md) saying
    why."""
    import bitplan.service.cli as service_cli
    import bitplan.service.http_server as http_server

    started = []
    monkeypatch.setattr(http_server, "serve", lambda app, **kwargs: started.append(app.state.settings))
    data = ["--data-dir", str(tmp_path / "data")]
    assert service_cli.main(["serve", *data, "--no-worker", "--max-active-jobs", "12"]) == 0
    assert started[0].max_active_jobs == 12
    assert service_cli.main(["serve", *data, "--no-worker"]) == 0 and started[1].max_active_jobs == 4
    with pytest.raises(SystemExit) as refused:
        service_cli.main(["serve", *data, "--max-active-jobs", "0"])
    assert refused.value.code == 2 and "must be a positive number of jobs, got 0" in capsys.readouterr().err
