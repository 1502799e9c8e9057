"""Issue 14: ``DELETE`` of jobs and artifacts (their files and disk space), a 409 for a job still queued or
running, other keys kept out, and the retention sweep (``bitplan serve --retention-days``), on both stores with a
real tiny model (one real job per store: the suite stays quick)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bitplan.service.app import create_app, hash_key
from bitplan.service.retention import RetentionSweeper, sweep
from tests.service.test_jobs import SMALL, settings_for, wait_for

KEYS = {hash_key("k1"): "alice", hash_key("k2"): "bob"}
ALICE, BOB = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, object]:
    if request.param == "sqlite":
        return {}
    import redis

    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return {"redis_url": url}


def test_issue14_delete_artifacts_and_jobs_and_sweep_old_ones(tmp_path: Path, tiny_llama_dir: Path,
                                                             backend: dict) -> None:
    data = tmp_path / "data"
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, api_keys=KEYS, **backend))) as client:
        store = client.app.state.store  # type: ignore[attr-defined]
        created = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": [3.0, 4.0],
                                                **SMALL}, headers=ALICE)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        # a second job waits behind the first (one worker): still queued or running, so not deletable
        second = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0,
                                               "num_samples": 400, "seq_len": 64}, headers=ALICE).json()["id"]
        refused = client.delete(f"/v1/jobs/{second}", headers=ALICE)
        assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert client.delete(f"/v1/jobs/{second}", headers=BOB).status_code == 404  # not bob's to see
        assert client.post(f"/v1/jobs/{second}/cancel", headers=ALICE).status_code == 202

        job = wait_for(client, job_id, {"succeeded", "failed"}, headers=ALICE)
        assert job["status"] == "succeeded", job["error"]
        first, last = (a["id"] for a in job["artifacts"])
        assert (data / "artifacts" / first).is_dir() and (data / "artifacts" / last).is_dir()
        assert client.delete(f"/v1/artifacts/{first}", headers=BOB).status_code == 404
        assert client.delete(f"/v1/artifacts/{first}", headers=ALICE).status_code == 204
        assert not (data / "artifacts" / first).exists() and (data / "artifacts" / last).is_dir()
        assert client.get(f"/v1/artifacts/{first}", headers=ALICE).status_code == 404
        assert client.get(f"/v1/artifacts/{first}/files/manifest.json", headers=ALICE).status_code == 404
        assert [a["id"] for a in client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()["artifacts"]] == [last]
        frontier = client.get(f"/v1/jobs/{job_id}/frontier", headers=ALICE).json()
        assert [m["artifact"] for m in frontier["measured"]] == [last]  # from the artifact that is left
        assert client.delete(f"/v1/artifacts/{first}", headers=ALICE).status_code == 404  # gone is gone
        events = client.get(f"/v1/jobs/{job_id}/events", headers=ALICE).json()["items"]
        assert events[-1]["kind"] == "artifact_deleted" and events[-1]["data"] == {"artifact": first}

        # the retention sweep: nothing young goes; a folder no job names does; then the old finished jobs
        orphan = data / "artifacts" / "0123abcd-0"
        orphan.mkdir(parents=True)
        (orphan / "quantized.safetensors").write_bytes(b"x" * 1000)
        assert sweep(store, data, keep_s=3600) == {"jobs": 0, "orphans": 1, "bytes": 1000}
        assert not orphan.exists() and (data / "artifacts" / last).is_dir()
        wait_for(client, second, {"cancelled"}, headers=ALICE)
        size = sum(p.stat().st_size for p in (data / "artifacts" / last).rglob("*") if p.is_file())
        sweeper = RetentionSweeper(store, data, keep_s=0.5, every_s=0.1)  # what --retention-days runs
        sweeper.start()
        try:
            deadline = time.monotonic() + 30
            while client.get(f"/v1/jobs/{job_id}", headers=ALICE).status_code != 404:
                assert time.monotonic() < deadline, "the retention sweep did not remove the finished job"
                time.sleep(0.2)
        finally:
            sweeper.stop()
        assert size > 0 and not (data / "artifacts" / last).exists()
        assert client.get(f"/v1/jobs/{second}", headers=ALICE).status_code == 404  # the cancelled one too
        assert client.get(f"/v1/jobs/{job_id}/events", headers=ALICE).status_code == 404
        assert client.get("/v1/jobs", headers=ALICE).json()["items"] == []
        assert client.delete(f"/v1/jobs/{job_id}", headers=ALICE).status_code == 404


def test_issue14_delete_of_a_finished_job_and_the_retention_setting(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """``DELETE /v1/jobs/{id}`` of a cancelled job (no worker needed), and ``--retention-days`` wired to the
    sweeper the service starts."""
    settings = settings_for(tmp_path, tiny_llama_dir, embedded_worker=False, retention_days=2.0)
    app = create_app(settings)
    assert app.state.sweeper.keep_s == 2 * 86400
    assert create_app(settings_for(tmp_path / "b", tiny_llama_dir, embedded_worker=False)).state.sweeper is None
    with TestClient(app) as client:
        job_id = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0,
                                               **SMALL}).json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
