"""Job records and events in Redis, implementing the :class:`bitplan.service.domain.JobStore` protocol, for workers
on several machines (the queue is on the same Redis through Huey).

Layout under the prefix: ``job:{id}`` (the job as JSON), ``events:{id}`` (a list of JSON events, seq = position),
``owner:{owner}`` (sorted set of job ids by creation time), ``idem:{owner}:{key}`` (job id), ``all`` (sorted set
of every job id). Every change is an optimistic transaction (WATCH / MULTI) on the job's key, so claims are
exclusive and a stale attempt's writes are refused exactly as in SQLite.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from bitplan.service.domain import (
    ACTIVE,
    LEASED,
    STATUSES,
    TERMINAL,
    Event,
    Job,
    JobActive,
    JobStatus,
    StaleAttempt,
    TooManyJobs,
)


class RedisJobStore:
    def __init__(self, url: str, *, prefix: str = "bitplan:") -> None:
        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix

    def close(self) -> None:
        self.redis.close()

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @staticmethod
    def _load(raw: bytes | None) -> Job | None:
        return None if raw is None else Job(**json.loads(raw))

    def _transaction(self, job_id: str, change: Callable[[Job], tuple[Job | None, list[tuple[str, dict[str, Any]]]]]
                     ) -> Job:
        """Apply ``change(job) -> (new job or None for no write, events)`` atomically; retried on conflicts."""
        key, events_key = self._key("job", job_id), self._key("events", job_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key, events_key)
                    job = self._load(pipe.get(key))
                    if job is None:
                        raise KeyError(job_id)
                    updated, events = change(job)
                    if updated is None:
                        pipe.unwatch()
                        return job
                    seq = pipe.llen(events_key)
                    pipe.multi()
                    pipe.set(key, json.dumps(dataclasses.asdict(updated)))
                    for kind, data in events:
                        seq += 1
                        pipe.rpush(events_key, json.dumps({"seq": seq, "at": time.time(), "kind": kind,
                                                           "data": data}))
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue

    # -- jobs ---------------------------------------------------------------------------------------------------
    def create(self, owner: str, request: dict[str, Any], idempotency_key: str | None, *,
               max_active: int | None = None) -> tuple[Job, bool]:
        """As :meth:`SqliteJobStore.create`; the count and the insert hold the owner's lock (a Redis lock)."""
        if max_active is None:
            return self._create(owner, request, idempotency_key, None)
        with self.redis.lock(self._key("create-lock", owner), timeout=30, blocking_timeout=30):
            return self._create(owner, request, idempotency_key, max_active)

    def _create(self, owner: str, request: dict[str, Any], idempotency_key: str | None,
                max_active: int | None) -> tuple[Job, bool]:
        if max_active is not None and idempotency_key is not None:
            existing = self.get_by_key(owner, idempotency_key)
            if existing is not None:
                return existing, False
        if max_active is not None and self.count_active(owner) >= max_active:
            raise TooManyJobs(owner)
        now = time.time()
        job = Job(id=uuid.uuid4().hex, owner=owner, idempotency_key=idempotency_key, request=request,
                  status=JobStatus.QUEUED, stage=None, progress=0.0, attempt=0, error=None, result=None, created=now,
                  updated=now, started=None, lease_until=None, cancel_requested=False)
        if idempotency_key is not None:
            claimed = self.redis.set(self._key("idem", owner, idempotency_key), job.id, nx=True)
            if not claimed:
                existing_id = self.redis.get(self._key("idem", owner, idempotency_key))
                for _ in range(50):  # the first request may still be writing its job
                    existing = self.get(existing_id.decode()) if existing_id else None
                    if existing is not None:
                        return existing, False
                    time.sleep(0.01)
                raise RuntimeError("idempotency key points to a job that was never written")
        with self.redis.pipeline() as pipe:
            pipe.set(self._key("job", job.id), json.dumps(dataclasses.asdict(job)))
            pipe.rpush(self._key("events", job.id), json.dumps({"seq": 1, "at": now, "kind": "queued", "data": {}}))
            pipe.zadd(self._key("owner", owner), {job.id: now})
            pipe.zadd(self._key("all"), {job.id: now})
            pipe.execute()
        return job, True

    def get(self, job_id: str) -> Job | None:
        return self._load(self.redis.get(self._key("job", job_id)))

    def get_by_key(self, owner: str, idempotency_key: str) -> Job | None:
        job_id = self.redis.get(self._key("idem", owner, idempotency_key))
        return self.get(job_id.decode()) if job_id else None

    def _jobs(self, ids: list[bytes]) -> list[Job]:
        raws = self.redis.mget([self._key("job", i.decode()) for i in ids]) if ids else []
        return [job for job in (self._load(r) for r in raws) if job is not None]

    def list(self, owner: str, *, status: str | None = None, after: tuple[float, str] | None = None,
             limit: int = 50) -> list[Job]:
        low = after[0] if after else "-inf"
        jobs = self._jobs(self.redis.zrangebyscore(self._key("owner", owner), low, "+inf"))
        jobs.sort(key=lambda j: (j.created, j.id))
        if after is not None:
            jobs = [j for j in jobs if (j.created, j.id) > after]
        if status is not None:
            jobs = [j for j in jobs if j.status == status]
        return jobs[:limit]

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for job in self._jobs(self.redis.zrange(self._key("all"), 0, -1)):
            counts[job.status] += 1
        return counts

    def count_active(self, owner: str) -> int:
        return sum(j.status in ACTIVE
                   for j in self._jobs(self.redis.zrange(self._key("owner", owner), 0, -1)))

    def claim(self, job_id: str, lease_s: float) -> int | None:
        claimed: list[int] = []

        def change(job: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
            claimed.clear()
            if job.status != JobStatus.QUEUED:
                return None, []
            now = time.time()
            if job.cancel_requested:
                return dataclasses.replace(job, status=JobStatus.CANCELLED, updated=now), [("cancelled", {})]
            attempt = job.attempt + 1
            claimed.append(attempt)
            return dataclasses.replace(job, status=JobStatus.RUNNING, attempt=attempt, started=now, updated=now,
                                       lease_until=now + lease_s, stage="starting", progress=0.0, eta_at=None), \
                [("running", {"attempt": attempt})]

        try:
            self._transaction(job_id, change)
        except KeyError:
            return None
        return claimed[0] if claimed else None

    @staticmethod
    def _fenced(job: Job, fence: int) -> None:
        if job.attempt != fence or job.status not in LEASED:
            raise StaleAttempt(f"job {job.id}: attempt {fence} is no longer the current one")

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> bool:
        def change(job: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
            self._fenced(job, fence)
            now = time.time()
            return dataclasses.replace(job, lease_until=now + lease_s, updated=now), []

        return self._transaction(job_id, change).cancel_requested

    def progress(self, job_id: str, fence: int, stage: str, fraction: float, detail: dict[str, Any],
                 eta_at: float | None = None) -> None:
        def change(job: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
            self._fenced(job, fence)
            return dataclasses.replace(job, stage=stage, progress=fraction, updated=time.time(), eta_at=eta_at), \
                [("progress", {"stage": stage, "fraction": fraction, **detail})]

        self._transaction(job_id, change)

    @staticmethod
    def _finished(job: Job, status: str, result: dict[str, Any] | None, error: dict[str, Any] | None
                  ) -> tuple[Job, list[tuple[str, dict[str, Any]]]]:
        return dataclasses.replace(job, status=status, result=result, error=error, updated=time.time(),
                                   lease_until=None, progress=1.0 if status == JobStatus.SUCCEEDED else job.progress), \
            [(status, {"error": error} if error else {})]

    def finish(self, job_id: str, fence: int, status: str, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:
        def change(job: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
            self._fenced(job, fence)
            return self._finished(job, status, result, error)

        self._transaction(job_id, change)

    def request_cancel(self, job_id: str) -> Job:
        def change(job: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
            if job.status == JobStatus.QUEUED:
                return self._finished(dataclasses.replace(job, cancel_requested=True), "cancelled", None, None)
            if job.status == JobStatus.RUNNING:
                return dataclasses.replace(job, cancel_requested=True, status=JobStatus.CANCELLING,
                                           updated=time.time()), \
                    [("cancelling", {})]
            return None, []

        return self._transaction(job_id, change)

    def release(self, job_id: str, fence: int, reason: str) -> bool:
        def change(job: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
            self._fenced(job, fence)
            if job.cancel_requested:
                return self._finished(job, "cancelled", None, None)
            return dataclasses.replace(job, status=JobStatus.QUEUED, stage=None, lease_until=None,
                                       updated=time.time()), [("requeued", {"reason": reason, "attempt": fence})]

        return self._transaction(job_id, change).status == JobStatus.QUEUED

    def reap(self, max_attempts: int) -> list[str]:
        requeued = []
        now = time.time()
        for job in self._jobs(self.redis.zrange(self._key("all"), 0, -1)):
            if job.status not in LEASED or job.lease_until is None or job.lease_until >= now:
                continue

            def change(current: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
                if current.status not in LEASED or current.lease_until is None \
                        or current.lease_until >= time.time():
                    return None, []
                if current.cancel_requested:
                    return self._finished(current, "cancelled", None, None)
                if current.attempt >= max_attempts:
                    return self._finished(current, "failed", None, {
                        "code": "worker_lost", "retryable": True,
                        "message": f"the worker stopped heartbeating {current.attempt} times; giving up"})
                return dataclasses.replace(current, status=JobStatus.QUEUED, stage=None, lease_until=None,
                                           updated=time.time()), \
                    [("requeued", {"reason": "lease expired", "attempt": current.attempt})]

            if self._transaction(job.id, change).status == JobStatus.QUEUED:
                requeued.append(job.id)
        return requeued

    def queued_ids(self) -> list[str]:
        jobs = self._jobs(self.redis.zrange(self._key("all"), 0, -1))
        return [j.id for j in sorted(jobs, key=lambda j: j.created) if j.status == JobStatus.QUEUED]

    def add_model(self, owner: str, record: dict[str, Any]) -> dict[str, Any]:
        model = {"id": "mdl-" + uuid.uuid4().hex[:16], "created": time.time(), **record}
        with self.redis.pipeline() as pipe:
            pipe.set(self._key("model", owner, model["id"]), json.dumps(model))
            pipe.zadd(self._key("models", owner), {model["id"]: model["created"]})
            pipe.execute()
        return model

    def get_model(self, owner: str, model_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self._key("model", owner, model_id))
        return json.loads(raw) if raw else None

    def list_model_records(self, owner: str) -> list[dict[str, Any]]:
        ids = self.redis.zrange(self._key("models", owner), 0, -1)
        raws = self.redis.mget([self._key("model", owner, i.decode()) for i in ids]) if ids else []
        return [json.loads(r) for r in raws if r]

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        raws = self.redis.lrange(self._key("events", job_id), after, after + limit - 1)
        return [Event(job_id=job_id, **json.loads(r)) for r in raws]

    # -- deletion and retention -------------------------------------------------------------------------------
    def delete(self, job_id: str) -> Job | None:
        """As :meth:`SqliteJobStore.delete`: the job's key, events, indexes and idempotency key, in one
        transaction watched on the job (a worker's concurrent write retries and then finds no job)."""
        key = self._key("job", job_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    job = self._load(pipe.get(key))
                    if job is None:
                        pipe.unwatch()
                        return None
                    if job.status not in TERMINAL:
                        pipe.unwatch()
                        raise JobActive(job_id)
                    pipe.multi()
                    pipe.delete(key, self._key("events", job_id))
                    pipe.zrem(self._key("owner", job.owner), job_id)
                    pipe.zrem(self._key("all"), job_id)
                    if job.idempotency_key is not None:
                        pipe.delete(self._key("idem", job.owner, job.idempotency_key))
                    pipe.execute()
                    return job
                except redis.WatchError:
                    continue

    def drop_artifact(self, job_id: str, artifact_id: str) -> Job:
        def change(job: Job) -> tuple[Job | None, list[tuple[str, dict[str, Any]]]]:
            result = job.outcome().without(artifact_id)
            return (dataclasses.replace(job, result=result.to_dict(), updated=time.time()),
                    [("artifact_deleted", {"artifact": artifact_id})])

        return self._transaction(job_id, change)

    def finished_before(self, before: float) -> list[str]:
        jobs = self._jobs(self.redis.zrangebyscore(self._key("all"), "-inf", before))  # created before: a superset
        return [j.id for j in sorted(jobs, key=lambda j: j.updated) if j.status in TERMINAL and j.updated < before]
