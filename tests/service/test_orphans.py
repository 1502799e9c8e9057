"""An attempt's process dies with its worker (issue 15, fault 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

PARENT = """
import multiprocessing, os, sys, time
from bitplan.service.worker import die_with_parent

def child(parent):
    die_with_parent(parent)
    time.sleep(120)

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    process.start()
    print(process.pid, flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_issue15_fault9_a_sigkilled_worker_takes_its_attempt_with_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    assert _alive(child_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child_pid)


class _StoreThatLosesRedis:
    """A real SQLite store whose heartbeats fail like a Redis outage after the first ``healthy`` ones."""

    def __init__(self, store, healthy: int) -> None:  # type: ignore[no-untyped-def]
        self.store, self.healthy = store, healthy

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.store, name)

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> bool:
        import redis

        if self.healthy <= 0:
            raise redis.exceptions.ConnectionError("Error 111 connecting to redis: Connection refused")
        self.healthy -= 1
        return self.store.heartbeat(job_id, fence, lease_s)


def test_issue15_fault8_a_store_outage_ends_the_attempt_without_a_stray_process(tmp_path, tiny_llama_dir
                                                                                 ) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing

    from bitplan.service.store import SqliteJobStore
    from bitplan.service.worker import JobRunner, WorkerSettings
    from bitplan.spec import JobSpec

    store = SqliteJobStore(tmp_path / "jobs.db")
    spec = JobSpec.from_flat(model=str(tiny_llama_dir), bits_per_weight=3.5, num_samples=2, seq_len=32, group_size=64)
    job, _ = store.create("me", spec.to_dict(), None)
    settings = WorkerSettings(data_dir=tmp_path, heartbeat_s=0.2, lease_s=30)
    JobRunner(_StoreThatLosesRedis(store, healthy=1), settings)(job.id)  # type: ignore[arg-type]
    assert multiprocessing.active_children() == []  # killed and reaped: no stray process, no zombie
    assert not settings.staging_dir.exists() or list(settings.staging_dir.iterdir()) == []
    assert store.get(job.id).status == "running"  # its lease will expire and the reaper requeue it
    assert not (tmp_path / "artifacts").exists()
