"""An attack campaign against a real ``bitplan serve`` (issue 15's figures), on SQLite and, when redis-server is
installed, on Redis: hostile and careless requests of every kind the hardening issue lists, real tiny jobs, the
server SIGKILLed mid-job and started again, Redis restarted mid-job. Prints JSON: requests tried, their statuses,
5xx answers (target 0), jobs lost (submitted, never finished), stray processes left in the server's session after
it stopped, staging folders left.

    python bench/attack.py [--rounds 3] [--backends sqlite,redis]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _own_folder_off_path  # (before any first-party import)
import httpx

SERVICE = [sys.executable, "-m", "bitplan.service.cli"]
JOB = {"num_samples": 2, "seq_len": 32, "group_size": 64}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Campaign:
    """Counts every answer; a 5xx, a timeout or a dropped connection on a request that should be answered is a
    violation, kept with what was sent."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=30)
        self.status: collections.Counter[str] = collections.Counter()
        self.violations: list[dict[str, Any]] = []
        self.accepted: list[str] = []  # every job the service took (202 on POST /v1/jobs)
        self.outage = False  # while Redis is stopped on purpose a 503 with Retry-After is the documented answer
        self.outage_503 = 0

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            self.status["error"] += 1
            self.violations.append({"request": f"{method} {path}", "error": f"{type(error).__name__}: {error}"})
            return None
        self.status[str(response.status_code)] += 1
        if method == "POST" and path == "/v1/jobs" and response.status_code == 202:
            self.accepted.append(response.json()["id"])
        if self.outage and response.status_code == 503 and "retry-after" in response.headers:
            self.outage_503 += 1
            self.status["503"] -= 1
            self.status["503 (outage)"] += 1
        elif response.status_code >= 500:
            self.violations.append({"request": f"{method} {path}", "status": response.status_code,
                                    "body": response.text[:300]})
        return response

    def raw(self, payload: bytes, expect: bytes) -> None:
        """Bytes straight onto a socket; the answer must start with ``expect``."""
        port = int(self.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(payload)
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except TimeoutError:
                pass
        answer = b"".join(chunks)
        self.status[answer[9:12].decode(errors="replace") or "closed"] += 1
        if not answer.startswith(expect):
            self.violations.append({"request": repr(payload[:60]), "answer": repr(answer[:120])})


def hostile_requests(c: Campaign, root: Path, rng: random.Random) -> None:
    """One round of the hostile inputs the issue lists (faults 1-4, 6, 10, 11 and the smaller ones); the jobs the
    cap flood gets in are cancelled at once."""
    for ref in ("tiny\x00", "\x00", "../tiny", "/etc/passwd", "http://example.com/m", "tiny/../../x", "a" * 5000,
                "escape", "missing-weight", "fifo/model.safetensors", "bad-config", "zero-layers"):
        c.send("POST", "/v1/jobs", json={"model": ref, "bits_per_weight": 4.0, **JOB})
        c.send("POST", "/v1/models", json={"reference": ref})
    for value in ("9223372036854775808", "9223372036854775807", "-1", "1e308", "nan", "abc", "0x10", " 1"):
        c.send("GET", "/v1/jobs/nojob/events", params={"after": value})
        c.send("GET", "/v1/jobs", params={"limit": value})
        c.send("GET", "/v1/jobs/nojob/events/stream", headers={"Last-Event-ID": (value * 3).strip()})
    for body in ({"model": "tiny", "bits_per_weight": "four"}, {"model": "tiny", "bits_per_weight": [1e308]},
                 {"model": "tiny", "bits_per_weight": -3}, {"model": 7}, [], "x", None, {"model": "tiny", "x": 1},
                 {"model": "tiny", "bits_per_weight": 4, "num_samples": 2**70},
                 {"model": "tiny", "uniform_bits": 4, "bits_per_weight": 4},
                 {"model": "tiny", "latency_ms_per_token": 5}, {"model": "tiny", "formats": "Q9_K", "bpw": 4}):
        c.send("POST", "/v1/jobs", json=body)
    for _ in range(20):  # random JSON values of random shapes
        body = {rng.choice(["model", "bits_per_weight", "bytes", "target", "formats", "seq_len", "zzz"]):
                rng.choice([None, True, -1, 0, 2**63, 3.5, "", "tiny", [1, "a"], {"a": {}}]) for _ in range(4)}
        c.send("POST", "/v1/jobs", json=body)
    c.send("POST", "/v1/jobs", content=b"{" * 100_000, headers={"content-type": "application/json"})
    c.send("POST", "/v1/jobs", content=(b"x" * 65536 for _ in range(64)),
           headers={"content-type": "application/json"})  # 4 MiB chunked: over the body limit
    c.send("GET", "/v1/artifacts/nojob-0/files/manifest.json", headers={"Range": "bytes=99999999999-"})
    c.send("GET", "/v1/jobs", headers={"Authorization": "Bearer " + "k" * 10_000})
    c.send("GET", "/v1/jobs/" + "%00" * 10)
    c.send("DELETE", "/v1/jobs/nojob")
    c.send("GET", "/metrics")
    c.send("GET", "/readyz")
    c.raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.1 408")  # a half-sent header: timed out
    c.raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n", b"HTTP/1.1 400")  # TLS hello
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # fault 6: the active-job cap under concurrency
        answers = list(pool.map(lambda _: c.send("POST", "/v1/jobs", json={"model": "tiny", "bits_per_weight": 4.0,
                                                                             "num_samples": 400, "seq_len": 64}),
                                range(16)))
    made = [a.json()["id"] for a in answers if a is not None and a.status_code == 202]
    for job_id in made:
        c.send("POST", f"/v1/jobs/{job_id}/cancel")



def hostile_models(root: Path, tiny: Path) -> None:
    """Model folders that must be refused: a symlink out of the root, a missing weight, a FIFO, a bad config."""
    outside = root.parent / "outside"
    shutil.copytree(tiny, outside, dirs_exist_ok=True)
    (root / "escape").mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, root / "escape" / name)
    if not (root / "escape" / "model.safetensors").exists():
        (root / "escape" / "model.safetensors").symlink_to(outside / "model.safetensors")
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, root / "missing-weight", dirs_exist_ok=True)
    weights = load_file(str(tiny / "model.safetensors"))
    weights.pop(next(k for k in weights if k.endswith("mlp.down_proj.weight")))
    save_file(weights, str(root / "missing-weight" / "model.safetensors"), metadata={"format": "pt"})
    (root / "fifo").mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, root / "fifo" / name)
    if not (root / "fifo" / "model.safetensors").exists():
        os.mkfifo(root / "fifo" / "model.safetensors")
    for name, change in (("bad-config", {"hidden_size": "abc"}), ("zero-layers", {"num_hidden_layers": 0})):
        shutil.copytree(tiny, root / name, dirs_exist_ok=True)
        config = json.loads((tiny / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, **change}))


def settle(c: Campaign, limit_s: float) -> dict[str, str]:
    """Wait (at most ``limit_s``) until every job the service took has ended; each job's last status (a failed
    job as ``failed:CODE``)."""
    deadline = time.monotonic() + limit_s
    while True:
        final = {}
        for job_id in c.accepted:
            try:
                response = c.http.get(f"/v1/jobs/{job_id}")
            except httpx.HTTPError:
                final[job_id] = "unreachable"
                continue
            job = response.json() if response.status_code == 200 else {"status": "missing"}
            final[job_id] = job["status"] + (f":{job['error']['code']}" if job.get("error") else "")
        if all(s.split(":")[0] in ("succeeded", "failed", "cancelled") for s in final.values()) \
                or time.monotonic() > deadline:
            return final
        time.sleep(2)


def start_server(port: int, data: Path, root: Path, log: Path, redis_url: str | None) -> subprocess.Popen[bytes]:
    extra = ["--redis-url", redis_url] if redis_url else []
    process = subprocess.Popen([*SERVICE, "serve", "--port", str(port), "--data-dir", str(data), "--model-root",
                                str(root), "--header-timeout", "2", *extra], stdout=log.open("ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"the server did not come up: {log.read_text()[-2000:]}")


def session_processes(sid: int) -> list[int]:
    """Processes still alive in session ``sid`` (the server's and its job children's)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and "zombie" not in (entry / "status").read_text().lower():
                    alive.append(int(entry.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError, OSError):
                continue
    return alive


def stop(process: subprocess.Popen[bytes], sig: int) -> list[int]:
    """Signal the server alone, wait for it, and return what is left of its session after 10 s."""
    process.send_signal(sig)
    process.wait(timeout=60)
    time.sleep(10)
    return session_processes(process.pid)


def run_backend(backend: str, rounds: int, base: Path, tiny: Path) -> dict[str, Any]:
    data, root, log = base / backend / "data", base / backend / "root", base / backend / "serve.log"
    root.mkdir(parents=True)
    shutil.copytree(tiny, root / "tiny")
    hostile_models(root, tiny)
    redis_process, redis_url = None, None
    if backend == "redis":
        redis_port = free_port()
        redis_cmd = [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--save", "",
                     "--appendonly", "yes", "--dir", str(base / backend)]
        redis_process = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        time.sleep(1)
    port = free_port()
    server = start_server(port, data, root, log, redis_url)
    campaign = Campaign(f"http://127.0.0.1:{port}")
    rng = random.Random(15)
    stray: list[int] = []
    for round_index in range(rounds):
        for budget in (3.0, 4.0):  # real jobs beside the attacks
            campaign.send("POST", "/v1/jobs", json={"model": "tiny", "bits_per_weight": budget, **JOB})
        if round_index == 0:  # the server SIGKILLed mid-job, then started again: its jobs must still finish
            campaign.send("POST", "/v1/jobs", json={"model": "tiny", "bits_per_weight": 4.0, "num_samples": 120,
                                                    "seq_len": 64})
            time.sleep(4)
            stray += stop(server, signal.SIGKILL)
            server = start_server(port, data, root, log, redis_url)
        hostile_requests(campaign, root, rng)
        if round_index == 1 and redis_process is not None:  # Redis stopped mid-job, then started again
            campaign.send("POST", "/v1/jobs", json={"model": "tiny", "bits_per_weight": 4.0, "num_samples": 60,
                                                    "seq_len": 64})
            time.sleep(3)
            redis_process.send_signal(signal.SIGTERM)
            redis_process.wait(timeout=30)
            campaign.outage = True
            for _ in range(20):  # requests while Redis is down: 503 with Retry-After, never 500
                campaign.send("GET", "/v1/jobs")
                campaign.send("GET", "/readyz")
                campaign.send("POST", "/v1/jobs", json={"model": "tiny", "bits_per_weight": 4.0, **JOB})
            campaign.outage = False
            time.sleep(3)
            redis_process = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
        settle(campaign, 600)  # every job taken so far ends before the next round (the per-key cap is 4)
    final = settle(campaign, 900)
    stray += stop(server, signal.SIGTERM)
    staging = data / "staging"
    left = [p.name for p in staging.iterdir()] if staging.is_dir() else []
    if redis_process is not None:
        redis_process.terminate()
        redis_process.wait(timeout=30)
    return {"requests": sum(campaign.status.values()), "status": dict(sorted(campaign.status.items())),
            "five_xx": sum(v for k, v in campaign.status.items() if k.startswith("5") and "outage" not in k),
            "violations": campaign.violations[:20], "violation_count": len(campaign.violations),
            "outage_503_with_retry_after": campaign.outage_503,
            "jobs_submitted": len(campaign.accepted), "jobs_final": dict(collections.Counter(final.values())),
            # lost: never finished, gone, or failed for a reason of ours (not the caller's bad input)
            "jobs_lost": sum(s.split(":")[0] not in ("succeeded", "cancelled", "failed")
                             or s in ("failed:internal", "failed:worker_lost") for s in final.values()),
            "stray_processes": len(stray), "staging_left": len(left)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,redis")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny model
    from tests.conftest import _word_tokenizer, make_tiny_llama

    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="bitplan-attack-"))
    tiny = base / "tiny"
    make_tiny_llama().save_pretrained(tiny, safe_serialization=True)
    _word_tokenizer(512).save_pretrained(tiny)
    report: dict[str, Any] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(),
        "benchmark": "attack", "command": " ".join(["python", "bench/attack.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "backends": {}}
    for backend in args.backends.split(","):
        if backend == "redis" and shutil.which("redis-server") is None:
            report["backends"][backend] = {"skipped": "redis-server is not installed"}
            continue
        report["backends"][backend] = run_backend(backend, args.rounds, base, tiny)
    shutil.rmtree(base, ignore_errors=True)
    runs = [r for r in report["backends"].values() if "requests" in r]
    report["totals"] = {key: sum(r[key] for r in runs) for key in ("requests", "five_xx", "violation_count",
                                                                   "jobs_submitted", "jobs_lost", "stray_processes",
                                                                   "staging_left")}
    report["total_s"] = round(time.perf_counter() - started, 1)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
