"""Issue 14: ``DELETE`` of jobs and artifacts (their files and disk space), a 409 for a job still running, and the
retention sweep (``bitplan serve --retention-days``) on both stores, with a real tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bitplan.service.app import create_app
from bitplan.service.retention import sweep
from tests.service.test_jobs import SMALL, settings_for, wait_for


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, object]:
    if request.param == "sqlite":
        return {}
    import redis

    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return {"redis_url": url}


def _succeeded(client: TestClient, model: str, budgets: list[float]) -> dict:
    response = client.post("/v1/jobs", json={"model": model, "bits_per_weight": budgets, **SMALL})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    return job


def test_issue14_delete_an_artifact_then_its_job(tmp_path: Path, tiny_llama_dir: Path, backend: dict) -> None:
    data = tmp_path / "data"
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, **backend))) as client:
        job = _succeeded(client, tiny_llama_dir.name, [3.0, 4.0])
        first, second = (a["id"] for a in job["artifacts"])
        assert (data / "artifacts" / first).is_dir() and (data / "artifacts" / second).is_dir()
        assert client.delete(f"/v1/artifacts/{first}").status_code == 204
        assert not (data / "artifacts" / first).exists() and (data / "artifacts" / second).is_dir()
        assert client.get(f"/v1/artifacts/{first}").status_code == 404
        assert client.get(f"/v1/artifacts/{first}/files/manifest.json").status_code == 404
        kept = client.get(f"/v1/jobs/{job['id']}").json()
        assert [a["id"] for a in kept["artifacts"]] == [second]
        assert [m["artifact"] for m in client.get(f"/v1/jobs/{job['id']}/frontier").json()["measured"]] == [second]
        assert client.delete(f"/v1/artifacts/{first}").status_code == 404  # gone is gone
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["items"]
        assert events[-1]["kind"] == "artifact_deleted" and events[-1]["data"] == {"artifact": first}

        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert client.get(f"/v1/jobs/{job['id']}/events").status_code == 404
        assert client.get(f"/v1/artifacts/{second}").status_code == 404
        assert not (data / "artifacts" / second).exists()
        assert job["id"] not in {j["id"] for j in client.get("/v1/jobs").json()["items"]}
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 404


def test_issue14_a_queued_job_is_not_deleted_and_other_keys_cannot(tmp_path: Path, tiny_llama_dir: Path,
                                                                   backend: dict) -> None:
    from bitplan.service.app import hash_key

    keys = {hash_key("k1"): "alice", hash_key("k2"): "bob"}
    settings = settings_for(tmp_path, tiny_llama_dir, embedded_worker=False, api_keys=keys, **backend)
    alice, bob = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    with TestClient(create_app(settings)) as client:
        created = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL},
                              headers=alice)
        job_id = created.json()["id"]
        refused = client.delete(f"/v1/jobs/{job_id}", headers=alice)
        assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert client.delete(f"/v1/jobs/{job_id}", headers=bob).status_code == 404  # not bob's to see
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).status_code == 202
        assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "cancelled"
        assert client.delete(f"/v1/jobs/{job_id}", headers=alice).status_code == 204


def test_issue14_retention_removes_old_finished_jobs_and_orphan_folders(tmp_path: Path, tiny_llama_dir: Path,
                                                                       backend: dict) -> None:
    data = tmp_path / "data"
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, **backend))) as client:
        old = _succeeded(client, tiny_llama_dir.name, [4.0])
        store = client.app.state.store  # type: ignore[attr-defined]
        orphan = data / "artifacts" / "0123abcd-0"  # a folder no job names (a crash between record and files)
        orphan.mkdir(parents=True)
        (orphan / "quantized.safetensors").write_bytes(b"x" * 1000)
        folder = data / "artifacts" / old["artifacts"][0]["id"]
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert sweep(store, data, keep_s=3600) == {"jobs": 0, "orphans": 1, "bytes": 1000}  # too young to go
        assert folder.is_dir() and not orphan.exists()
        assert sweep(store, data, keep_s=3600, now=time.time() + 7200) == {"jobs": 1, "orphans": 0, "bytes": size}
        assert not folder.exists() and client.get(f"/v1/jobs/{old['id']}").status_code == 404


def test_issue14_the_services_own_sweeper_applies_the_retention(tmp_path: Path, tiny_llama_dir: Path,
                                                                backend: dict) -> None:
    """What ``--retention-days`` sets, with a retention of 3 seconds: the finished job is there, then it is gone."""
    data = tmp_path / "data"
    settings = settings_for(tmp_path, tiny_llama_dir, retention_days=3 / 86400, retention_sweep_s=0.2, **backend)
    with TestClient(create_app(settings)) as client:
        job = _succeeded(client, tiny_llama_dir.name, [4.0])
        folder = data / "artifacts" / job["artifacts"][0]["id"]
        assert folder.is_dir()
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the retention sweep did not remove the finished job"
            time.sleep(0.2)
        assert not folder.exists()
