"""Service benchmark: job status reads per second on loopback, with p50/p99 latency, while a real job
(SmolLM2-135M) runs in the embedded worker, against a bare FastAPI endpoint served the same way in the same run.
Prints one JSON object.

    python bench/service.py [--seconds 10] [--clients 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _own_folder_off_path  # (before any first-party import)
import httpx
import numpy as np

BARE_APP = """
import uvicorn
from fastapi import FastAPI
app = FastAPI()
@app.get("/v1/jobs/{job_id}")
def job(job_id: str) -> dict:
    return {"id": job_id, "status": "running", "progress": {"stage": "x", "fraction": 0.5, "eta_s": 1.0}}
uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def hammer(url: str, seconds: float, clients: int) -> dict[str, float]:
    """``clients`` threads, each with its own keep-alive connection, reading ``url`` for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.monotonic() + seconds

    def run(slot: int) -> None:
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < stop:
                began = time.perf_counter()
                response = client.get(url)
                latencies[slot].append(time.perf_counter() - began)
                response.raise_for_status()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = np.array([v for slot in latencies for v in slot])
    return {"reads": int(values.size), "reads_per_s": values.size / seconds,
            "p50_ms": float(np.percentile(values, 50) * 1e3), "p99_ms": float(np.percentile(values, 99) * 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="bitplan-bench-service-"))
    service_port, bare_port = free_port(), free_port()
    service = subprocess.Popen([sys.executable, "-m", "bitplan.service.cli", "serve", "--port", str(service_port),
                                "--data-dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    bare = subprocess.Popen([sys.executable, "-c", BARE_APP.replace("PORT", str(bare_port))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{service_port}"
    try:
        wait_up(f"{base}/healthz")
        wait_up(f"http://127.0.0.1:{bare_port}/v1/jobs/x")
        job = httpx.post(f"{base}/v1/jobs", json={"model": args.model, "bits_per_weight": 3.5,
                                                  "num_samples": 16}).json()
        deadline = time.monotonic() + 300
        while httpx.get(f"{base}/v1/jobs/{job['id']}").json()["progress"]["stage"] in (None, "starting"):
            if time.monotonic() > deadline:  # wait for the compute stages, past the model load
                raise RuntimeError("the job never reached its compute stages")
            time.sleep(0.5)
        # Alternate the two targets in short rounds so that both see the same phase of the running job.
        rounds = 4
        service_runs, bare_runs = [], []
        for _ in range(rounds):
            service_runs.append(hammer(f"{base}/v1/jobs/{job['id']}", args.seconds / rounds, args.clients))
            bare_runs.append(hammer(f"http://127.0.0.1:{bare_port}/v1/jobs/{job['id']}", args.seconds / rounds,
                                    args.clients))
        state = httpx.get(f"{base}/v1/jobs/{job['id']}").json()
        httpx.post(f"{base}/v1/jobs/{job['id']}/cancel")

        def merge(runs: list[dict[str, float]]) -> dict[str, float]:
            return {"reads_per_s": float(np.mean([r["reads_per_s"] for r in runs])),
                    "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
                    "p99_ms": float(np.max([r["p99_ms"] for r in runs]))}

        service_stats, bare_stats = merge(service_runs), merge(bare_runs)
        report = {"benchmark": "service", "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
                  "cpus": os.cpu_count(), "command": " ".join(sys.argv),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "clients": args.clients, "seconds_each": args.seconds,
                  "job_during_measurement": {"model": args.model, "status": state["status"],
                                             "stage": state["progress"]["stage"]},
                  "job_status_reads": service_stats, "bare_fastapi_endpoint": bare_stats,
                  "throughput_ratio": service_stats["reads_per_s"] / bare_stats["reads_per_s"],
                  "p50_ratio": service_stats["p50_ms"] / bare_stats["p50_ms"]}
        sys.stdout.write(json.dumps(report) + "\n")
    finally:
        for process in (service, bare):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
