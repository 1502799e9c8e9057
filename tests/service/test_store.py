"""The job stores (SQLite, and Redis on a real redis-server): leases, fencing tokens and reaper, without any
worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bitplan.service.domain import JobStatus
from bitplan.service.store import JobStore, SqliteJobStore, StaleAttempt


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return SqliteJobStore(tmp_path / "jobs.db")
    from bitplan.service.redis_store import RedisJobStore

    url = request.getfixturevalue("redis_url")
    redis_store = RedisJobStore(url, prefix=f"test-{tmp_path.name}:")
    return redis_store


def test_claim_is_exclusive_and_fenced(store: JobStore) -> None:
    job, created = store.create("me", {"model": "m"}, "key-1")
    assert created and store.create("me", {"model": "m"}, "key-1") == (job, False)
    assert store.create("someone-else", {"model": "m"}, "key-1")[1]  # keys are per owner
    fence = store.claim(job.id, lease_s=30)
    assert fence == 1 and store.claim(job.id, lease_s=30) is None
    store.progress(job.id, fence, "load", 0.1, {})
    with pytest.raises(StaleAttempt):
        store.progress(job.id, fence + 1, "load", 0.2, {})
    store.finish(job.id, fence, "succeeded", result={"artifacts": []})
    with pytest.raises(StaleAttempt):
        store.finish(job.id, fence, "failed")
    assert store.get(job.id).status == "succeeded"


def test_expired_lease_is_requeued_and_the_old_attempt_fenced_off(store: JobStore) -> None:
    job, _ = store.create("me", {}, None)
    old = store.claim(job.id, lease_s=0.05)
    time.sleep(0.1)
    assert store.reap(max_attempts=3) == [job.id]
    assert store.get(job.id).status == "queued"
    new = store.claim(job.id, lease_s=30)
    assert new == old + 1
    with pytest.raises(StaleAttempt):
        store.heartbeat(job.id, old, lease_s=30)  # the stale worker learns it lost the job
    assert store.heartbeat(job.id, new, lease_s=30) is False
    kinds = [e.kind for e in store.events(job.id)]
    assert kinds == ["queued", "running", "requeued", "running"]


def test_worker_lost_after_max_attempts_and_cancel_while_lost(store: JobStore) -> None:
    job, _ = store.create("me", {}, None)
    for _ in range(2):
        store.claim(job.id, lease_s=0.01)
        time.sleep(0.05)
        store.reap(max_attempts=2)
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost" and failed.attempt == 2
    other, _ = store.create("me", {}, None)
    store.claim(other.id, lease_s=0.01)
    assert store.request_cancel(other.id).status == "cancelling"
    time.sleep(0.05)
    store.reap(max_attempts=3)
    assert store.get(other.id).status == "cancelled"


def test_cancel_of_a_finished_job_changes_nothing(store: JobStore) -> None:
    job, _ = store.create("me", {}, None)
    fence = store.claim(job.id, lease_s=30)
    store.finish(job.id, fence, "succeeded", result={})
    assert store.request_cancel(job.id).status == "succeeded"
    with pytest.raises(KeyError):
        store.request_cancel("missing")


def test_issue13_both_stores_implement_the_job_store_protocol(store: JobStore) -> None:
    assert isinstance(store, JobStore)
    job, _ = store.create("me", {"model": "m"}, None)
    assert store.get(job.id).status is JobStatus.QUEUED and set(store.status_counts()) == {s.value for s in JobStatus}


def test_issue15_fault6_the_active_job_cap_holds_under_concurrency(store: JobStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from bitplan.service.domain import TooManyJobs

    def attempt(index: int) -> bool:
        try:
            store.create("racer", {"n": index}, None, max_active=4)
            return True
        except TooManyJobs:
            return False

    with ThreadPoolExecutor(16) as pool:
        created = list(pool.map(attempt, range(16)))
    assert sum(created) == 4 and store.count_active("racer") == 4


def test_issue15_fault9_staging_of_attempts_without_a_lease_is_swept(store: JobStore, tmp_path: Path) -> None:
    from bitplan.service.worker import sweep_staging

    staging = tmp_path / "staging"
    running, _ = store.create("me", {}, None)
    fence = store.claim(running.id, lease_s=30)
    done, _ = store.create("me", {}, None)
    store.finish(done.id, store.claim(done.id, lease_s=30), "succeeded", result={})
    for name in (f"{running.id}-attempt{fence}", f"{running.id}-attempt{fence - 1}", f"{done.id}-attempt1",
                 "nojob-attempt1", "junk"):
        (staging / name / "0").mkdir(parents=True)
    removed = sweep_staging(store, staging)
    assert sorted(removed) == sorted([f"{running.id}-attempt{fence - 1}", f"{done.id}-attempt1", "nojob-attempt1",
                                      "junk"])
    assert [p.name for p in staging.iterdir()] == [f"{running.id}-attempt{fence}"]
