"""The service as users run it: ``bitplan serve`` / ``bitplan worker`` processes, the CLI client, and a worker
killed with SIGKILL in the middle of a job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bitplan.service.client import Client

SERVICE_CLI = [sys.executable, "-m", "bitplan.service.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A process in its own session, so that a kill reaches the job processes it spawned too."""
    return subprocess.Popen([*SERVICE_CLI, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"service exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"service did not come up: {log.read_text()}")


def long_job_and_worker(api_only: tuple[str, Path, list[str]], model_dir: Path, tmp_path: Path, *, lease_s: float
                        ) -> tuple[Client, dict, list[str], subprocess.Popen[bytes]]:
    """A job long enough to stop a worker in (200 calibration windows), and a worker process running it."""
    url, data, backend = api_only
    client = Client(url)
    job = client.jobs.create(model=model_dir.name, bits_per_weight=4.0, num_samples=200, seq_len=64, group_size=64)
    worker_args = ["worker", "--data-dir", str(data), "--lease", str(lease_s), "--heartbeat", "0.3", *backend]
    return client, job, worker_args, start(worker_args, tmp_path / "worker1.log")


def running_mid_job(client: Client, job_id: str, log: Path) -> None:
    """Wait until the job runs and is past its first steps (a worker stopped now stops it mid-job)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = client.jobs.get(job_id)
        if state["status"] == "running" and state["progress"]["fraction"] > 0.06:
            return
        time.sleep(0.1)
    raise AssertionError((state, log.read_text()))


@pytest.fixture(params=["sqlite", "redis"])
def api_only(request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_dir: Path
             ) -> Iterator[tuple[str, Path, list[str]]]:
    """An API-only service, and the backend flags its workers need (SQLite in the data folder, or Redis)."""
    port = free_port()
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    backend = ["--redis-url", request.getfixturevalue("redis_url")] if request.param == "redis" else []
    if backend:
        import redis

        redis.Redis.from_url(backend[1]).flushdb()
    process = start(["serve", "--port", str(port), "--data-dir", str(data), "--model-root",
                     str(tiny_llama_dir.parent), "--no-worker", *backend], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
        yield url, data, backend
    finally:
        kill_group(process, signal.SIGTERM)


def test_serve_submit_wait_download(tmp_path: Path, tiny_llama_dir: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    process = start(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model-root",
                     str(tiny_llama_dir.parent)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
        submitted = subprocess.run([*SERVICE_CLI, "submit", "--url", url, "--model", tiny_llama_dir.name, "--bpw",
                                    "4", "--samples", "2", "--seq-len", "32", "--wait", "--json"],
                                   capture_output=True, text=True, timeout=300)
        assert submitted.returncode == 0, submitted.stderr
        assert "HTTP Request" not in submitted.stderr  # issue 14: the client's request logs only with -v
        job = json.loads(submitted.stdout.strip().splitlines()[-1])
        assert job["status"] == "succeeded", job
        out = tmp_path / "download"
        downloaded = subprocess.run([*SERVICE_CLI, "download", "--url", url, job["artifacts"][0]["id"], "--out",
                                     str(out), "--json"], capture_output=True, text=True, timeout=120)
        assert downloaded.returncode == 0, downloaded.stderr
        assert (out / "manifest.json").is_file() and (out / "quantized.safetensors").is_file()
        from bitplan.targets.artifact import load_artifact

        load_artifact(out)  # the downloaded folder loads on its own
        whole = (out / "quantized.safetensors").read_bytes()  # issue 14: an interrupted download resumes
        (out / "quantized.safetensors").unlink()
        (out / "quantized.safetensors.part").write_bytes(whole[: len(whole) // 2])
        again = subprocess.run([*SERVICE_CLI, "download", "--url", url, job["artifacts"][0]["id"], "--out",
                                str(out), "--json"], capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert (out / "quantized.safetensors").read_bytes() == whole
        assert not (out / "quantized.safetensors.part").exists()
        bad = subprocess.run([*SERVICE_CLI, "status", "--url", url, "no-such-job"], capture_output=True, text=True)
        assert bad.returncode == 3 and "404" in bad.stderr
    finally:
        kill_group(process, signal.SIGTERM)


def test_sigkill_of_a_worker_mid_job_ends_on_a_later_attempt(tmp_path: Path,
                                                              api_only: tuple[str, Path, list[str]],
                                                              tiny_llama_dir: Path) -> None:
    url, data, backend = api_only
    client, job, worker_args, first = long_job_and_worker(api_only, tiny_llama_dir, tmp_path, lease_s=3)
    try:
        running_mid_job(client, job["id"], tmp_path / "worker1.log")
    finally:
        kill_group(first)  # SIGKILL: no cleanup, no final write
    second = start(worker_args, tmp_path / "worker2.log")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = client.jobs.get(job["id"])
            if state["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.3)
        assert state["status"] == "succeeded", (state, (tmp_path / "worker2.log").read_text())
        assert state["attempt"] == 2
        kinds = [e["kind"] for e in client.jobs.events(job["id"])]
        assert "requeued" in kinds
        assert [p.name for p in (data / "artifacts").iterdir()] == [f"{job['id']}-0"]
    finally:
        kill_group(second, signal.SIGTERM)


def test_submit_starts_the_embedded_service_and_downloads(tmp_path: Path, tiny_llama_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    data = tmp_path / "data"
    args = [*SERVICE_CLI, "submit", "--start-service", "--url", url, "--data-dir", str(data), "--model-root",
            str(tiny_llama_dir.parent), "--model", tiny_llama_dir.name, "--bpw", "4", "--samples", "2",
            "--seq-len", "32", "--out", str(tmp_path / "out"), "--json", "--quiet"]
    try:
        first = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        job = json.loads(first.stdout.strip().splitlines()[-1])
        assert job["status"] == "succeeded" and job["downloaded"] == [str(tmp_path / "out")]
        assert "started the embedded service" in first.stderr
        from bitplan.targets.artifact import load_artifact

        load_artifact(tmp_path / "out")
        second = subprocess.run(args[:-4] + ["--json", "--quiet"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 0 and "started the embedded service" not in second.stderr  # reused
    finally:
        pid = int((data / "serve.pid").read_text())
        os.killpg(pid, signal.SIGTERM)


def test_issue15_a_sigtermed_worker_gives_its_job_back_at_once(tmp_path: Path, api_only: tuple[str, Path, list[str]],
                                                                tiny_llama_dir: Path) -> None:
    """SIGTERM (how a container or systemd stops a worker): the running attempt kills its child, the job is
    queued again at once (not left "running" until the lease expires: the lease here is 60 s), and no job
    process or staging folder is left."""
    url, data, backend = api_only
    client, job, worker_args, first = long_job_and_worker(api_only, tiny_llama_dir, tmp_path, lease_s=60)
    running_mid_job(client, job["id"], tmp_path / "worker1.log")
    stopped_at = time.monotonic()
    os.kill(first.pid, signal.SIGTERM)  # the worker alone, as a process manager does
    first.wait(timeout=40)
    state = client.jobs.get(job["id"])
    assert state["status"] == "queued" and time.monotonic() - stopped_at < 40, state
    assert [e["data"].get("reason") for e in client.jobs.events(job["id"]) if e["kind"] == "requeued"] == \
        ["worker shut down"]
    staging = data / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker exits on its own once its pipe closes
    while (orphans := subprocess.run(["pgrep", "-a", "-s", str(first.pid)], capture_output=True,
                                     text=True).stdout.splitlines()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert orphans == [], orphans  # its session: no job process left
    # a later worker takes it up as attempt 2 (test_sigkill_of_a_worker_mid_job... runs such a job to the end)
    assert state["attempt"] == 1 and client.jobs.cancel(job["id"])["status"] == "cancelled"


def test_issue15_a_half_sent_request_header_is_answered_408_and_closed(tmp_path: Path) -> None:
    """Slowloris: a client that sends part of a request's headers used to hold its connection for ever. With
    ``--header-timeout 1`` it gets a 408 problem and a close within a few seconds; the same holds for a second,
    half-sent request on a kept-alive connection; a client that sends its headers in time is served; bytes that
    are not HTTP get a 400 problem."""
    port = free_port()
    log = tmp_path / "serve.log"
    process = start(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--no-worker",
                     "--header-timeout", "1"], log)
    url = f"http://127.0.0.1:{port}"

    def read_all(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
        started, chunks = time.monotonic(), []
        sock.settimeout(limit_s)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks), time.monotonic() - started
            chunks.append(chunk)

    try:
        wait_until_up(url, process, log)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the headers
            answer, waited = read_all(sock, 15)
        assert answer.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in answer, answer
        assert waited < 6
        with socket.create_connection(("127.0.0.1", port)) as sock:  # kept alive: the second request is late
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            answer, waited = read_all(sock, 15)
        assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer and waited < 6, answer
        with socket.create_connection(("127.0.0.1", port)) as sock:  # slow but in time: served
            for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n\r\n"):
                sock.sendall(part)
                time.sleep(0.2)
            answer, _ = read_all(sock, 15)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        with socket.create_connection(("127.0.0.1", port)) as sock:  # not HTTP at all: a 400 problem, not text
            sock.sendall(b"HELLO THERE\r\n\r\n")
            answer, _ = read_all(sock, 15)
        assert answer.startswith(b"HTTP/1.1 400") and b"application/problem+json" in answer, answer
        assert b'"code": "bad_request"' in answer
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # the server is unharmed
    finally:
        kill_group(process, signal.SIGTERM)
