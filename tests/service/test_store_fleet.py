"""Issue 44: an API and workers that share nothing but Redis and an S3 object store (a real SeaweedFS server).

Each process gets its own ``--data-dir`` (its scratch); the model is pushed to the store by the API and pulled by
the worker, the artifact is uploaded by the worker and streamed by the API, and a worker killed with SIGKILL leaves
no half-written object: its job ends on a second worker with another data folder."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bitplan.service.client import Client
from tests.service.test_processes import SERVICE_CLI, free_port, kill_group, running_mid_job, wait_until_up
from tests.service.weed import WeedServer, s3_environment


@dataclass
class Fleet:
    """An API-only service on Redis and an S3 store, and how to start workers beside it."""

    url: str
    store_url: str
    bucket: str
    prefix: str
    redis_url: str
    env: dict[str, str]
    root: Path

    def start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        """A ``bitplan`` process in its own session with the store's variables."""
        return subprocess.Popen([*SERVICE_CLI, *args], stdout=(self.root / f"{name}.log").open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True, env=self.env)

    def worker(self, name: str, *, lease_s: float = 30.0) -> subprocess.Popen[bytes]:
        return self.start(["worker", "--redis-url", self.redis_url, "--store", self.store_url, "--data-dir",
                           str(self.root / name), "--lease", str(lease_s), "--heartbeat", "0.3"], name)

    def objects(self) -> dict[str, dict[str, object]]:
        """Every object under the prefix: key -> size and the sha256 recorded when it was written."""
        client = _boto(self.env)
        found: dict[str, dict[str, object]] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            for item in page.get("Contents", []):
                head = client.head_object(Bucket=self.bucket, Key=item["Key"])
                found[item["Key"][len(self.prefix) + 1:]] = {"size": item["Size"],
                                                             "sha256": head["Metadata"].get("sha256")}
        return found

    def incomplete_uploads(self) -> list[str]:
        page = _boto(self.env).list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + "/")
        return [upload["Key"] for upload in page.get("Uploads", [])]


def _boto(env: dict[str, str]) -> object:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


@pytest.fixture
def fleet(tmp_path: Path, redis_url: str, weed: str, tiny_llama_dir: Path) -> Iterator[Fleet]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    bucket = f"bitplan-fleet-{uuid.uuid4().hex[:8]}"  # a new bucket: the service creates it
    env = {**os.environ, **s3_environment(weed, tmp_path)}
    fleet = Fleet(url=f"http://127.0.0.1:{free_port()}", store_url=f"s3://{bucket}/jobs", bucket=bucket,
                  prefix="jobs", redis_url=redis_url, env=env, root=tmp_path)
    api = fleet.start(["serve", "--port", fleet.url.rpartition(":")[2], "--no-worker", "--redis-url", redis_url,
                       "--store", fleet.store_url, "--data-dir", str(tmp_path / "api"), "--model-root",
                       str(tiny_llama_dir.parent)], "api")
    try:
        wait_until_up(fleet.url, api, tmp_path / "api.log")
        yield fleet
    finally:
        kill_group(api, signal.SIGTERM)


def _wait_done(client: Client, job_id: str, log: Path, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.jobs.get(job_id)
        if state["status"] in ("succeeded", "failed", "cancelled"):
            return state  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError((state, log.read_text()[-3000:]))


def _artifact_objects(fleet: Fleet, artifact_id: str) -> dict[str, dict[str, object]]:
    return {k: v for k, v in fleet.objects().items() if k.startswith(f"artifacts/{artifact_id}/")}


def test_issue44_api_and_worker_share_only_redis_and_the_store(fleet: Fleet, tiny_llama_dir: Path,
                                                               tmp_path: Path) -> None:
    worker = fleet.worker("worker1")
    client = Client(fleet.url)
    try:
        job = client.jobs.create(model=tiny_llama_dir.name, bits_per_weight=4.0, num_samples=2, seq_len=32)
        assert job["request"]["model"].startswith("objects:models/")  # pushed: the worker needs no model root
        state = _wait_done(client, job["id"], tmp_path / "worker1.log")
        assert state["status"] == "succeeded", (state, (tmp_path / "worker1.log").read_text()[-3000:])
    finally:
        kill_group(worker, signal.SIGTERM)
    artifact = state["artifacts"][0]
    out = client.artifacts.download(artifact["id"], tmp_path / "download")  # every file's sha256 checked
    manifest = (out / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == artifact["manifest_sha256"]
    from bitplan.targets.artifact import load_artifact

    load_artifact(out)  # checks every file against the manifest's sha256 again
    stored = _artifact_objects(fleet, artifact["id"])
    listed = {f["name"]: f["sha256"] for f in client.artifacts.get(artifact["id"])["files"]}
    assert {k.rpartition("/")[2]: v["sha256"] for k, v in stored.items()} == listed
    assert all(k.startswith(f"artifacts/{artifact['id']}/attempt-1/") for k in stored)
    assert any(k.startswith("models/") and k.endswith("config.json") for k in fleet.objects())
    assert fleet.incomplete_uploads() == []
    # each process kept its files to itself: the API has no artifacts; the worker only its model cache
    assert not (tmp_path / "api" / "artifacts").exists() and not (tmp_path / "worker1" / "artifacts").exists()
    assert not any((tmp_path / "worker1" / "staging").iterdir())
    assert len(list((tmp_path / "worker1" / "model-cache" / "entries").iterdir())) == 1

    path = f"{fleet.url}/v1/artifacts/{artifact['id']}/files/quantized.safetensors"
    whole = (out / "quantized.safetensors").read_bytes()
    ranged = httpx.get(path, headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == whole[10:20]
    assert ranged.headers["content-range"] == f"bytes 10-19/{len(whole)}"
    assert httpx.get(path, headers={"Range": "bytes=-5"}).content == whole[-5:]
    beyond = httpx.get(path, headers={"Range": f"bytes={len(whole)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(whole)}"
    head = httpx.head(path)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(whole)
    assert head.headers["etag"] == f'"{hashlib.sha256(whole).hexdigest()}"'
    redirect = httpx.get(path, params={"redirect": "presigned"})
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).content == whole  # fetched from the store directly
    assert client.jobs.frontier(job["id"])["points"]  # the allocation problem, read from the store

    client.jobs.delete(job["id"])
    assert _artifact_objects(fleet, artifact["id"]) == {}


def test_issue44_a_worker_killed_mid_job_leaves_no_half_written_object(fleet: Fleet, tiny_llama_dir: Path,
                                                                       tmp_path: Path) -> None:
    """SIGKILL in the middle of a job: its lease expires, a worker with another data folder (another host) takes
    it as attempt 2; the bucket holds exactly the published artifact's complete objects, no upload in progress."""
    client = Client(fleet.url)
    job = client.jobs.create(model=tiny_llama_dir.name, bits_per_weight=4.0, num_samples=48, seq_len=64,
                             group_size=64)
    first = fleet.worker("worker1", lease_s=3)
    try:
        running_mid_job(client, job["id"], tmp_path / "worker1.log")
    finally:
        kill_group(first)  # SIGKILL: no cleanup, no final write
    second = fleet.worker("worker2", lease_s=3)
    try:
        state = _wait_done(client, job["id"], tmp_path / "worker2.log", timeout_s=480)
        assert state["status"] == "succeeded", (state, (tmp_path / "worker2.log").read_text()[-3000:])
    finally:
        kill_group(second, signal.SIGTERM)
    assert state["attempt"] == 2 and "requeued" in [e["kind"] for e in client.jobs.events(job["id"])]
    artifact = state["artifacts"][0]
    stored = {k: v for k, v in fleet.objects().items() if k.startswith("artifacts/")}
    listed = {f["name"]: f for f in client.artifacts.get(artifact["id"])["files"]}
    prefix = f"artifacts/{artifact['id']}/attempt-2/"
    assert stored == {prefix + name: {"size": f["bytes"], "sha256": f["sha256"]} for name, f in listed.items()}
    assert fleet.incomplete_uploads() == []
    client.artifacts.download(artifact["id"], tmp_path / "download")  # checked against the manifest's sha256


def test_issue44_an_unreachable_store_answers_503_and_the_cli_exits_4(tmp_path: Path, tiny_llama_dir: Path,
                                                                     weed_server: WeedServer) -> None:
    """The object store stopped: creating a job (its model must be pushed) is a 503 problem with Retry-After,
    never a 500, and ``bitplan submit`` exits 4 (unavailable) with the reason; once it is back, jobs are taken."""
    own = WeedServer(weed_server.binary, tmp_path / "weed")  # its own server: this test stops it
    own.start()
    env = {**os.environ, **s3_environment(own.endpoint, tmp_path)}
    url = f"http://127.0.0.1:{free_port()}"
    api = subprocess.Popen([*SERVICE_CLI, "serve", "--port", url.rpartition(":")[2], "--no-worker", "--store",
                            "s3://bitplan-outage/x", "--data-dir", str(tmp_path / "api"), "--model-root",
                            str(tiny_llama_dir.parent)], stdout=(tmp_path / "api.log").open("wb"),
                           stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_until_up(url, api, tmp_path / "api.log")
        own.stop()
        body = {"model": tiny_llama_dir.name, "bits_per_weight": 4.0, "num_samples": 2, "seq_len": 32}
        answer = httpx.post(f"{url}/v1/jobs", json=body, timeout=60)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5", answer.text
        assert answer.json()["code"] == "object_store_unavailable"
        submitted = subprocess.run([*SERVICE_CLI, "submit", "--url", url, "--model", tiny_llama_dir.name, "--bpw",
                                    "4", "--samples", "2", "--seq-len", "32", "--json"], capture_output=True,
                                   text=True, timeout=180, env=env)
        assert submitted.returncode == 4 and "object store" in submitted.stderr, submitted.stderr
        own.start()
        created = httpx.post(f"{url}/v1/jobs", json=body, timeout=60)
        assert created.status_code == 202 and created.json()["request"]["model"].startswith("objects:")
    finally:
        kill_group(api, signal.SIGTERM)
        own.stop()


def test_issue44_a_second_host_takes_the_sensitivity_from_the_shared_cache(fleet: Fleet, tiny_llama_dir: Path,
                                                                          tmp_path: Path) -> None:
    """The first job runs on worker1 alone and publishes its sensitivity to the store's ``cache/``; the same model
    and calibration at another budget then runs on worker2 alone, whose own cache (its data folder) is empty: its
    report says the sensitivity came from the shared store, and it published nothing half-written."""
    client = Client(fleet.url)
    options = {"model": tiny_llama_dir.name, "num_samples": 2, "seq_len": 32}
    states = []
    for name, bits in (("worker1", 4.0), ("worker2", 5.0)):
        worker = fleet.worker(name)
        try:
            job = client.jobs.create(bits_per_weight=bits, **options)
            states.append(_wait_done(client, job["id"], tmp_path / f"{name}.log"))
            assert states[-1]["status"] == "succeeded", (states[-1], (tmp_path / f"{name}.log").read_text()[-3000:])
        finally:
            kill_group(worker, signal.SIGTERM)
    first, second = (client.artifacts.get(state["artifacts"][0]["id"])["manifest"]["calibration"]
                     for state in states)
    assert first["sensitivity_cache"] == "miss"
    assert second["sensitivity_cache"] == "hit" and second["sensitivity_cache_from"] == "the shared object store"
    assert any(key.startswith("cache/sensitivity/") for key in fleet.objects())
    assert list((tmp_path / "worker2" / "cache" / "sensitivity").iterdir())  # kept on the second host too
    assert fleet.incomplete_uploads() == []
