"""The Python client (``bitplan.service.client``) against the app with the embedded backend: waiting on the event
stream, typed answers, the async client, and the typed error of a job that did not succeed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bitplan.service.app import create_app
from tests.service.test_jobs import SMALL, settings_for


@pytest.fixture()
def service(tmp_path: Path, tiny_llama_dir: Path):
    with TestClient(create_app(settings_for(tmp_path, tiny_llama_dir))) as client:
        yield client


def test_issue14_client_wait_is_woken_by_the_event_stream(service: TestClient, tiny_llama_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``Client.jobs.wait`` follows the server-sent events (it never sleeps between polls while the stream is
    open), and ``stream`` yields every event with its sequence number, ending when the job has ended."""
    from bitplan.service import client as client_module

    client = client_module.Client()
    client.http = service  # the app's own test transport (an httpx.Client)
    sleeps: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    job = client.jobs.create(model=tiny_llama_dir.name, bits_per_weight=4.0, **SMALL)
    done = client.jobs.wait(job["id"], progress=False)
    assert done["status"] == "succeeded" and sleeps == []
    events = list(client.jobs.stream(job["id"]))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["kind"] == "succeeded" and {e["kind"] for e in events} >= {"progress"}
    assert list(client.jobs.stream(job["id"], after=events[-2]["seq"])) == events[-1:]
    assert client.jobs.retrieve(job["id"])["status"] == "succeeded"
    # the ETA from measured rates: the job's stage durations are kept for the next job of its kind, which then
    # has an ETA from its first report on, and its bar's fraction never goes back
    times = json.loads((tmp_path / "data" / "stage-times.json").read_text())
    (stages,) = times.values()
    assert stages[0][0] == "load" and stages[-1][0] == "kl check" and all(s > 0 for _, s in stages)
    again = client.jobs.wait(client.jobs.create(model=tiny_llama_dir.name, bits_per_weight=3.0, **SMALL).id,
                             progress=False)
    progress = [e["data"] for e in client.jobs.events(again.id) if e["kind"] == "progress"]
    assert progress and all(p["eta_s"] is not None and p["eta_s"] >= 0 for p in progress), progress
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and again.progress.eta_s is None


def test_issue14_the_client_answers_with_the_services_own_models(service: TestClient, tiny_llama_dir: Path
                                                                 ) -> None:
    """Typed answers (the service's pydantic models), readable as mappings too, and their JSON unchanged."""
    from bitplan.service import client as client_module
    from bitplan.service.domain import JobStatus
    from bitplan.service.schemas import ArtifactPublic, EventPublic, FrontierPublic, JobPublic, ModelPublic

    client = client_module.Client()
    client.http = service
    job = client.jobs.create(model=tiny_llama_dir.name, bits_per_weight=4.0, **SMALL)
    assert isinstance(job, JobPublic) and job.status is JobStatus.QUEUED and job["status"] == "queued"
    done = client.jobs.wait(job.id, progress=False)
    assert isinstance(done, JobPublic) and done.status is JobStatus.SUCCEEDED and done.progress.fraction == 1.0
    assert done.to_dict() == service.get(f"/v1/jobs/{job.id}").json()  # the same JSON the route sent
    artifact = client.artifacts.get(done.artifacts[0].id)
    assert isinstance(artifact, ArtifactPublic) and all(len(f.sha256) == 64 for f in artifact.files)
    frontier = client.jobs.frontier(job.id)
    assert isinstance(frontier, FrontierPublic) and frontier.points and frontier.measured[0].artifact == artifact.id
    events = client.jobs.events(job.id)
    assert all(isinstance(e, EventPublic) for e in events) and events[0].seq == 1 and events[0].kind == "queued"
    assert [j.id for j in client.jobs.list()] == [job.id]
    models = client.models.list()
    assert all(isinstance(m, ModelPublic) for m in models) and "smollm2-135m" in {m.id for m in models}
    assert done.get("no-such-field", "default") == "default" and "status" in done
    with pytest.raises(KeyError):
        done["no-such-field"]


def test_issue14_the_async_client_runs_a_job_to_the_end(service: TestClient, tiny_llama_dir: Path) -> None:
    """``AsyncClient`` against the running app (its ASGI transport; the embedded worker started by the test
    client): create, wait, typed answers, the frontier and the artifact, a clear error, cancel and delete."""
    import asyncio

    import httpx

    from bitplan.service.client import AsyncClient, ServiceError
    from bitplan.service.domain import JobStatus
    from bitplan.service.schemas import FrontierPublic, JobPublic

    async def scenario() -> None:
        async with AsyncClient("http://test", transport=httpx.ASGITransport(app=service.app)) as client:
            job = await client.create(model=tiny_llama_dir.name, bits_per_weight=4.0, **SMALL)
            assert isinstance(job, JobPublic) and job.status is JobStatus.QUEUED
            done = await client.wait(job.id, poll_s=0.2, timeout_s=240)
            assert done.status is JobStatus.SUCCEEDED and done.artifacts
            assert isinstance(await client.frontier(job.id), FrontierPublic)
            artifact = await client.artifact(done.artifacts[0].id)
            assert {f.name for f in artifact.files} >= {"manifest.json", "quantized.safetensors"}
            assert [j.id for j in await client.list()] == [job.id]
            with pytest.raises(ServiceError) as refused:
                await client.create(model="no-such-model", bits_per_weight=4.0)
            assert refused.value.status == 422 and refused.value.param == "model"
            await client.delete(job.id)
            with pytest.raises(ServiceError) as gone:
                await client.get(job.id)
            assert gone.value.status == 404

    asyncio.run(scenario())


def test_issue45_wait_raises_the_typed_error_of_a_failed_or_cancelled_job(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """``wait`` (blocking and async) returns only a succeeded job; a cancelled one raises ``JobCancelled``, a failed
    one ``JobFailed``, both ``JobNotSucceeded`` with the job's id, status and error message (it returned them, and
    the README's snippet died with an IndexError on ``job.artifacts[0]``)."""
    import asyncio
    import re

    import httpx

    from bitplan.errors import ExitCode, JobCancelled, JobFailed, JobNotSucceeded
    from bitplan.service.client import AsyncClient, Client

    service = TestClient(create_app(settings_for(tmp_path, tiny_llama_dir, embedded_worker=False)))
    job_id = service.post("/v1/jobs", json={"model": tiny_llama_dir.name, "bits_per_weight": 4.0, **SMALL}).json()["id"]
    cancelled = service.post(f"/v1/jobs/{job_id}/cancel").json()
    client = Client()
    client.http = service  # the app's own test transport (an httpx.Client)
    with pytest.raises(JobCancelled, match=f"^job {re.escape(job_id)} cancelled$") as stopped:
        client.jobs.wait(job_id, progress=False)
    assert isinstance(stopped.value, JobNotSucceeded) and stopped.value.exit_code == ExitCode.JOB_CANCELLED
    assert (stopped.value.job_id, stopped.value.job_status, stopped.value.error_message) == (job_id, "cancelled", "")
    assert stopped.value.details == {"job": cancelled}  # what the command line's --json error line carries

    failed = {**cancelled, "status": "failed",
              "error": {"code": "internal", "message": "RuntimeError: boom", "retryable": False}}
    client.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=failed)))
    with pytest.raises(JobFailed, match=f"^job {re.escape(job_id)} failed: RuntimeError: boom$") as failure:
        client.jobs.wait(job_id, progress=False)
    assert (failure.value.job_id, failure.value.job_status, failure.value.error_message) == (
        job_id, "failed", "RuntimeError: boom")
    assert failure.value.exit_code == ExitCode.JOB_FAILED

    async def scenario(answer: dict[str, Any]) -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
        async with AsyncClient("http://test", transport=transport) as async_client:
            await async_client.wait(job_id, poll_s=0.01, timeout_s=5)

    with pytest.raises(JobFailed) as failure:
        asyncio.run(scenario(failed))
    assert (failure.value.job_id, failure.value.job_status, failure.value.error_message) == (
        job_id, "failed", "RuntimeError: boom")
    with pytest.raises(JobCancelled):
        asyncio.run(scenario(cancelled))
