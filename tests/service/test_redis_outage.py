"""Fault injection on Redis (issue 15): stop the Redis server mid-job and start it again. The API answers 503
(never 500) meanwhile, the job completes on a later attempt, and no process or staging folder is left."""

from __future__ import annotations

import multiprocessing
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bitplan.service.app import ServiceSettings, create_app


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (.ci/run installs it with apt-get)")
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
                                "--appendfsync", "always", "--save", "", "--dir", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port).ping()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.1)


def test_issue15_redis_stopped_mid_job_then_started_again(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tmp_path / "redis"
    folder.mkdir()
    redis_process = _start_redis(port, folder)
    settings = ServiceSettings(data_dir=tmp_path / "data", model_roots=[tiny_llama_dir.parent],
                               redis_url=f"redis://127.0.0.1:{port}/0", lease_s=4.0, heartbeat_s=0.3)
    statuses: list[int] = []
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            body = {"model": tiny_llama_dir.name, "bits_per_weight": 4.0, "num_samples": 64, "seq_len": 64,
                    "group_size": 64, "quality_windows": 0}
            job_id = client.post("/v1/jobs", json=body).json()["id"]
            deadline = time.monotonic() + 120
            while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            redis_process.terminate()
            redis_process.wait(timeout=20)
            for _ in range(10):
                statuses.append(client.get(f"/v1/jobs/{job_id}").status_code)
                time.sleep(0.2)
            redis_process = _start_redis(port, folder)
            deadline = time.monotonic() + 240
            while True:
                response = client.get(f"/v1/jobs/{job_id}")
                statuses.append(response.status_code)
                if response.status_code == 200 and response.json()["status"] in ("succeeded", "failed"):
                    break
                assert time.monotonic() < deadline, response.text
                time.sleep(0.3)
            job = response.json()
        assert job["status"] == "succeeded" and job["attempt"] >= 2, job
        assert 500 not in statuses and 503 in statuses, statuses
        assert multiprocessing.active_children() == []
        staging = settings.data_dir / "staging"
        assert not staging.exists() or list(staging.iterdir()) == []
    finally:
        redis_process.kill()
        redis_process.wait(timeout=20)
