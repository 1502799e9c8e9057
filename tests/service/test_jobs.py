"""Jobs through HTTP with the embedded backend (SQLite store, Huey on SQLite, a worker thread in the app)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bitplan.service.app import ServiceSettings, create_app, hash_key
from bitplan.sources.models import BUNDLED_MODELS

SMALL = {"num_samples": 2, "seq_len": 32, "group_size": 64}


def settings_for(tmp_path: Path, tiny_llama_dir: Path, **overrides: object) -> ServiceSettings:
    values = {"data_dir": tmp_path / "data", "model_roots": [tiny_llama_dir.parent], "lease_s": 5.0,
              "heartbeat_s": 0.3, **overrides}
    return ServiceSettings(**values)  # type: ignore[arg-type]


def wait_for(client: TestClient, job_id: str, statuses: set[str], timeout: float = 180.0,
             headers: dict[str, str] | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers or {}).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


@pytest.fixture()
def service(tmp_path: Path, tiny_llama_dir: Path):
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir))) as client:
        yield client


def test_full_job_end_to_end(service: TestClient, tiny_llama_dir: Path) -> None:
    response = service.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": [3.5, 4.5],
                                              "kl_refine_windows": 1, **SMALL})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    job = wait_for(service, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["fraction"] == 1.0 and job["attempt"] == 1
    assert [a["bits_per_weight"] <= b for a, b in zip(job["allocation"], [3.5, 4.5], strict=True)] == [True, True]
    assert all(a["kl_divergence"] > 0 for a in job["allocation"])
    quality = job["allocation"][0]["quality"]  # issue 14: measured on held-back text
    assert quality["text"] == "builtin:python-stdlib-docstrings" and quality["ppl_source"] > 0
    assert {"kl_mean", "kl_p99", "ppl", "top1_agreement", "windows", "seq_len"} <= set(quality)
    artifact = service.get(f"/v1/artifacts/{job['artifacts'][0]['id']}").json()
    files = {f["name"]: f for f in artifact["files"]}
    assert {"quantized.safetensors", "manifest.json"} <= set(files)
    url = f"/v1/artifacts/{artifact['id']}/files/quantized.safetensors"
    whole = service.get(url)
    assert whole.status_code == 200
    assert hashlib.sha256(whole.content).hexdigest() == files["quantized.safetensors"]["sha256"]
    assert whole.headers["etag"] == f'"{files["quantized.safetensors"]["sha256"]}"'
    unchanged = service.get(url, headers={"If-None-Match": whole.headers["etag"]})  # issue 15: 304, not 200
    assert unchanged.status_code == 304 and unchanged.content == b""
    manifest = service.get(f"/v1/artifacts/{artifact['id']}/files/manifest.json").json()
    assert manifest["kl_refinement"]["kept"] in ("first", "refined")  # the job re-solved with block KL shares
    head = service.head(url)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(whole.content)
    part = service.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == whole.content[10:20]
    events = service.get(f"/v1/jobs/{job_id}/events").json()["items"]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "running" and kinds[-1] == "succeeded" and "progress" in kinds
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    page = service.get(f"/v1/jobs/{job_id}/events", params={"after": 2, "limit": 3}).json()
    assert [e["seq"] for e in page["items"]] == [3, 4, 5] and page["has_more"] and page["next_cursor"] == "5"
    stream = service.get(f"/v1/jobs/{job_id}/events/stream", headers={"Last-Event-ID": str(len(events) - 2)})
    ids = [int(line[4:]) for line in stream.text.splitlines() if line.startswith("id: ")]
    assert ids == [len(events) - 1, len(events)]


def test_idempotent_post_and_conflicting_reuse(tmp_path: Path, tiny_llama_dir: Path) -> None:
    app = create_app(settings_for(tmp_path, tiny_llama_dir, embedded_worker=False))
    client = TestClient(app)
    body = {"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"})
    second = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert app.state.huey.pending_count() == 1
    clash = client.post("/v1/jobs", json={**body, "bits_per_weight": 3.0}, headers={"Idempotency-Key": "abc"})
    assert clash.status_code == 409 and "different request" in clash.json()["detail"]
    assert len(client.get("/v1/jobs").json()["items"]) == 1


def test_cancel_queued_is_immediate_and_idempotent(tmp_path: Path, tiny_llama_dir: Path) -> None:
    client = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, embedded_worker=False)))
    job_id = client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL}).json()["id"]
    for _ in range(2):
        response = client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 202 and response.json()["status"] == "cancelled"


def test_cancel_running_stops_and_publishes_nothing(service: TestClient, tiny_llama_dir: Path) -> None:
    body = {"model": tiny_llama_dir.name, "bits_per_weight": 4.0, "num_samples": 400, "seq_len": 64,
            "group_size": 64}
    job_id = service.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = service.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["fraction"] > 0.05:
            break
        time.sleep(0.1)
    started = time.monotonic()
    assert service.post(f"/v1/jobs/{job_id}/cancel").json()["status"] in ("cancelling", "cancelled")
    job = wait_for(service, job_id, {"cancelled", "succeeded", "failed"}, timeout=30)
    assert job["status"] == "cancelled" and time.monotonic() - started < 15
    assert job["artifacts"] == []
    data = service.app.state.settings.data_dir  # type: ignore[attr-defined]
    assert not list((data / "artifacts").glob(f"{job_id}*")) and not list((data / "staging").glob(f"{job_id}*"))


def test_restart_loses_no_job(tmp_path: Path, tiny_llama_dir: Path) -> None:
    before = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, embedded_worker=False)))
    job_id = before.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL}).json()["id"]
    before.app.state.store.close()  # type: ignore[attr-defined]
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir))) as after:
        assert wait_for(after, job_id, {"succeeded", "failed"})["status"] == "succeeded"


@pytest.mark.parametrize("body, status, reason", [
    ({"model": "../etc/passwd", "bits_per_weight": 4.0}, 422, "'..'"),
    ({"model": "/etc", "bits_per_weight": 4.0}, 422, "outside the allowed roots"),
    ({"model": "https://example.com/m.gguf", "bits_per_weight": 4.0}, 422, "not fetched"),
    ({"model": "smollm2-135m", "bits_per_weight": 0.5}, 422, "below the smallest achievable size"),
    ({"model": "smollm2-135m", "bits_per_weight": -1}, 422, "positive"),
    ({"model": "smollm2-135m", "bits_per_weight": 1e9}, 422, "above the largest achievable size"),
    ({"model": "smollm2-135m", "bytes": 10**30}, 422, "bytes"),
    ({"model": "smollm2-135m", "bits_per_weight": [4.0] * 50}, 422, "at most"),
    ({"model": "smollm2-135m"}, 422, "exactly one"),
    ({"model": "smollm2-135m", "bits_per_weight": 4.0, "metric": "magic"}, 422, "unknown metric"),
    ({"model": "smollm2-135m", "bits_per_weight": 4.0, "surprise": 1}, 422, "body.surprise: Extra inputs"),
    ({"model": "smollm2-135m", "bits_per_weight": 4.0, "num_samples": 4, "kl_refine_windows": 4}, 422,
     "at least 8 calibration samples"),
    ({"model": "smollm2-135m", "uniform_bits": 4, "kl_refine_windows": 2}, 422, "uniform bits have none"),
])
def test_bad_jobs_are_refused_before_queueing(tmp_path: Path, tiny_llama_dir: Path, body: dict, status: int,
                                              reason: str) -> None:
    app = create_app(settings_for(tmp_path, tiny_llama_dir, embedded_worker=False))
    response = TestClient(app).post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert reason in json.dumps(response.json())
    assert app.state.huey.pending_count() == 0


def test_bad_model_files_under_a_root(tmp_path: Path, tiny_llama_dir: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "weights.bin").write_bytes(b"\x80\x02pickle")
    bad = root / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    (root / "escape").symlink_to(tiny_llama_dir)
    client = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, model_roots=[root],
                                                embedded_worker=False)))
    for model, reason in (("weights.bin", "pickle"), ("bad", "header"), ("escape", "outside the allowed roots")):
        response = client.post("/v1/jobs", json={"model": model, "bits_per_weight": 4.0})
        assert response.status_code == 422 and reason in response.json()["detail"], (model, response.text)


def test_keys_see_only_their_own_jobs_and_limits(tmp_path: Path, tiny_llama_dir: Path) -> None:
    keys = {hash_key("alice-key"): "alice", hash_key("bob-key"): "bob"}
    client = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, api_keys=keys, embedded_worker=False,
                                                max_active_jobs=1)))
    alice, bob = {"Authorization": "Bearer alice-key"}, {"Authorization": "Bearer bob-key"}
    body = {"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL}
    assert client.post("/v1/jobs", json=body).status_code == 401
    assert client.post("/v1/jobs", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    job_id = client.post("/v1/jobs", json=body, headers=alice).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bob).status_code == 404
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    limited = client.post("/v1/jobs", json=body, headers=alice)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "30"
    assert client.post("/v1/jobs", content=b"x" * 100_000, headers={**alice, "content-type": "application/json"}
                       ).status_code == 413
    assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "bearer alice-key"}).status_code == 200
    assert client.get("/metrics").status_code == 401  # issue 15: metrics need a key when the service has keys
    assert client.get("/metrics", headers=alice).status_code == 200


def _walk(client: TestClient, path: str, limit: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """Every item of a list by following next_cursor while has_more, and every page seen."""
    items, pages, cursor = [], [], None
    while True:
        page = client.get(path, params={"limit": limit, **({"cursor": cursor} if cursor else {})}).json()
        assert set(page) == {"items", "next_cursor", "has_more"}, page
        assert (page["next_cursor"] is not None) == page["has_more"]
        items += page["items"]
        pages.append(page)
        if not page["has_more"]:
            return items, pages
        cursor = page["next_cursor"]


def test_issue14_every_list_pages_in_one_style(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Jobs, a job's events, models and latency tables: ``?cursor=&limit=`` in, ``items``, ``next_cursor`` and
    ``has_more`` out, the cursor null exactly at the end; a cursor that is not one is a 400 naming ``cursor``."""
    client = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, embedded_worker=False,
                                                max_active_jobs=10)))
    ids = [client.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL}).json()["id"]
           for _ in range(5)]
    jobs, pages = _walk(client, "/v1/jobs", 2)
    assert [j["id"] for j in jobs] == ids and len(pages) == 3
    client.post(f"/v1/jobs/{ids[0]}/cancel")  # queued, then cancelled: two events
    events, _ = _walk(client, f"/v1/jobs/{ids[0]}/events", 1)
    assert [e["seq"] for e in events] == [1, 2] and [e["kind"] for e in events] == ["queued", "cancelled"]
    assert client.get(f"/v1/jobs/{ids[0]}/events", params={"cursor": "1"}).json()["items"][0]["seq"] == 2
    registered = [client.post("/v1/models", json={"reference": tiny_llama_dir.name, "name": f"m{i}"}).json()["id"]
                  for i in range(3)]
    models, pages = _walk(client, "/v1/models", 2)
    assert [m["id"] for m in models] == [*BUNDLED_MODELS, *registered] and len(pages) > 1
    assert _walk(client, "/v1/latency-tables", 2)[0] == []
    for path, cursor in (("/v1/jobs", "garbage"), (f"/v1/jobs/{ids[0]}/events", "x1"), ("/v1/models", "mdl-none"),
                         ("/v1/latency-tables", "nope"), (f"/v1/jobs/{ids[0]}/events", "9" * 30)):
        refused = client.get(path, params={"cursor": cursor})
        assert refused.status_code == 400 and refused.json()["param"] == "cursor", (path, refused.text)
        assert refused.json()["code"] == "invalid_cursor"


def test_full_job_with_the_queue_on_redis(tmp_path: Path, tiny_llama_dir: Path, redis_url: str) -> None:
    import redis

    server = redis.Redis.from_url(redis_url)
    server.flushdb()
    api_only = create_app(settings_for(tmp_path, tiny_llama_dir, redis_url=redis_url, embedded_worker=False))
    job_id = TestClient(api_only).post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0,
                                                         **SMALL}).json()["id"]
    queues = [key for key in server.keys("*") if server.type(key) == b"list" and not key.startswith(b"bitplan:")]
    assert len(queues) == 1 and server.llen(queues[0]) == 1  # the job's message waits in Redis
    assert server.exists(f"bitplan:job:{job_id}")  # and its record too: nothing on local disk but artifacts
    assert not (tmp_path / "data" / "jobs.db").exists()
    api_only.state.store.close()  # type: ignore[attr-defined]
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, redis_url=redis_url))) as client:
        job = wait_for(client, job_id, {"succeeded", "failed"})
        assert job["status"] == "succeeded", job["error"]
    assert server.llen(queues[0]) == 0


def test_registered_models_are_per_key_and_usable_in_jobs(tmp_path: Path, tiny_llama_dir: Path) -> None:
    keys = {hash_key("a"): "alice", hash_key("b"): "bob"}
    client = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, api_keys=keys, embedded_worker=False)))
    alice, bob = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    created = client.post("/v1/models", json={"reference": tiny_llama_dir.name, "name": "tiny"}, headers=alice)
    assert created.status_code == 201, created.text
    model = created.json()
    assert model["format"] == "hf-folder" and model["bytes"] > 0
    assert created.headers["location"] == f"/v1/models/{model['id']}"
    assert client.get(f"/v1/models/{model['id']}", headers=alice).json() == model
    assert client.get(f"/v1/models/{model['id']}", headers=bob).status_code == 404
    assert model["id"] in [m["id"] for m in client.get("/v1/models", headers=alice).json()["items"]]
    assert model["id"] not in [m["id"] for m in client.get("/v1/models", headers=bob).json()["items"]]
    job = client.post("/v1/jobs", json={"model": model["id"], "bits_per_weight": 4.0, **SMALL}, headers=alice)
    assert job.status_code == 202 and job.json()["request"]["model"] == str(tiny_llama_dir.resolve())
    refused = client.post("/v1/jobs", json={"model": model["id"], "bits_per_weight": 4.0}, headers=bob)
    assert refused.status_code == 422
    assert client.post("/v1/models", json={"reference": "../x"}, headers=alice).status_code == 422
    assert client.get("/v1/models/smollm2-135m", headers=alice).json()["format"] == "bundled"


def test_issue45_job_status_prints_as_its_value() -> None:
    from bitplan.service.domain import JobStatus

    assert str(JobStatus.QUEUED) == "queued" and f"{JobStatus.FAILED}" == "failed"
    assert f"{JobStatus.RUNNING:>8}" == " running" and f"job {JobStatus.CANCELLING}" == "job cancelling"
    assert JobStatus("cancelled") is JobStatus.CANCELLED and json.dumps([JobStatus.SUCCEEDED]) == '["succeeded"]'
