"""Job records and events in SQLite (the embedded backend): the service's source of truth.

Every change to a running job carries the job's fencing token (the attempt number): a worker whose lease expired
and whose job was handed to another attempt can no longer write. A reaper re-queues jobs whose lease expired, or
fails them with ``worker_lost`` after ``max_attempts``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitplan.service.domain import (
    LEASED,
    STATUSES,
    TERMINAL,
    Event,
    Job,
    JobActive,
    JobResult,
    JobStatus,
    JobStore,
    StaleAttempt,
    TooManyJobs,
)

__all__ = ["STATUSES", "TERMINAL", "Event", "Job", "JobStatus", "JobStore", "SqliteJobStore", "StaleAttempt",
           "make_store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    idempotency_key TEXT,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    eta_at REAL,
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created, id);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    record TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


def job_from_row(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], owner=row["owner"], idempotency_key=row["idempotency_key"],
               request=json.loads(row["request"]), status=row["status"], stage=row["stage"],
               progress=row["progress"], attempt=row["attempt"],
               error=json.loads(row["error"]) if row["error"] else None,
               result=json.loads(row["result"]) if row["result"] else None, created=row["created"],
               updated=row["updated"], started=row["started"], lease_until=row["lease_until"],
               cancel_requested=bool(row["cancel_requested"]), eta_at=row["eta_at"])


class SqliteJobStore:
    """Thread-safe access to one SQLite file (WAL mode, one connection, a lock around every transaction)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.executescript(SCHEMA)
        columns = {r["name"] for r in self._connection.execute("PRAGMA table_info(jobs)")}
        if "eta_at" not in columns:  # a data folder written before the column existed
            self._connection.execute("ALTER TABLE jobs ADD COLUMN eta_at REAL")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    # -- jobs ---------------------------------------------------------------------------------------------------
    def create(self, owner: str, request: dict[str, Any], idempotency_key: str | None, *,
               max_active: int | None = None) -> tuple[Job, bool]:
        """Insert a queued job; with an idempotency key already used by ``owner``, return that job instead.
        Returns ``(job, created)``. With ``max_active``, the owner's active jobs are counted in the same
        transaction as the insert (:class:`TooManyJobs` when at the cap), so concurrent requests cannot pass it."""
        now = time.time()
        with self._transaction() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                 (owner, idempotency_key)).fetchone()
                if row is not None:
                    return job_from_row(row), False
            if max_active is not None and self._active(db, owner) >= max_active:
                raise TooManyJobs(owner)
            job_id = uuid.uuid4().hex
            db.execute("INSERT INTO jobs (id, owner, idempotency_key, request, status, created, updated) "
                       "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                       (job_id, owner, idempotency_key, json.dumps(request), now, now))
            self._event(db, job_id, "queued", {})
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row), True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def get_by_key(self, owner: str, idempotency_key: str) -> Job | None:
        with self._lock:
            row = self._connection.execute("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                           (owner, idempotency_key)).fetchone()
        return job_from_row(row) if row else None

    def list(self, owner: str, *, status: str | None = None, after: tuple[float, str] | None = None,
             limit: int = 50) -> list[Job]:
        """Jobs of ``owner``, oldest first, after the cursor ``(created, id)``."""
        query, params = "SELECT * FROM jobs WHERE owner = ?", [owner]
        if status is not None:
            query += " AND status = ?"
            params.append(status)
        if after is not None:
            query += " AND (created > ? OR (created = ? AND id > ?))"
            params += [after[0], after[0], after[1]]
        query += " ORDER BY created, id LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._connection.execute(query, params).fetchall()
        return [job_from_row(r) for r in rows]

    def status_counts(self) -> dict[str, int]:
        """Jobs per status (every status present, zeros included)."""
        with self._lock:
            rows = self._connection.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {**dict.fromkeys(STATUSES, 0), **{r[0]: int(r[1]) for r in rows}}

    @staticmethod
    def _active(db: sqlite3.Connection, owner: str) -> int:
        return int(db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running', "
                              "'cancelling')", (owner,)).fetchone()[0])

    def count_active(self, owner: str) -> int:
        with self._lock:
            return int(self._connection.execute(
                "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running', 'cancelling')",
                (owner,)).fetchone()[0])

    def claim(self, job_id: str, lease_s: float) -> int | None:
        """Start a new attempt of a queued job: returns its fencing token, or ``None`` when the job is not
        queued (already running elsewhere, finished or cancelled)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT status, attempt, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "queued":
                return None
            if row["cancel_requested"]:
                self._finish(db, job_id, "cancelled", None, None)
                return None
            attempt = row["attempt"] + 1
            db.execute("UPDATE jobs SET status = 'running', attempt = ?, started = ?, updated = ?, "
                       "lease_until = ?, stage = 'starting', progress = 0, eta_at = NULL WHERE id = ?",
                       (attempt, now, now, now + lease_s, job_id))
            self._event(db, job_id, "running", {"attempt": attempt})
        return attempt

    def _check_fence(self, db: sqlite3.Connection, job_id: str, fence: int) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["attempt"] != fence or row["status"] not in LEASED:
            raise StaleAttempt(f"job {job_id}: attempt {fence} is no longer the current one")
        return row

    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> bool:
        """Extend the lease; returns whether cancellation was requested."""
        now = time.time()
        with self._transaction() as db:
            row = self._check_fence(db, job_id, fence)
            db.execute("UPDATE jobs SET lease_until = ?, updated = ? WHERE id = ?", (now + lease_s, now, job_id))
            return bool(row["cancel_requested"])

    def progress(self, job_id: str, fence: int, stage: str, fraction: float, detail: dict[str, Any],
                 eta_at: float | None = None) -> None:
        now = time.time()
        with self._transaction() as db:
            self._check_fence(db, job_id, fence)
            db.execute("UPDATE jobs SET stage = ?, progress = ?, updated = ?, eta_at = ? WHERE id = ?",
                       (stage, fraction, now, eta_at, job_id))
            self._event(db, job_id, "progress", {"stage": stage, "fraction": fraction, **detail})

    def finish(self, job_id: str, fence: int, status: str, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:
        with self._transaction() as db:
            self._check_fence(db, job_id, fence)
            self._finish(db, job_id, status, result, error)

    def _finish(self, db: sqlite3.Connection, job_id: str, status: str, result: dict[str, Any] | None,
                error: dict[str, Any] | None) -> None:
        now = time.time()
        db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, updated = ?, lease_until = NULL, "
                   "progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END WHERE id = ?",
                   (status, json.dumps(result) if result is not None else None,
                    json.dumps(error) if error is not None else None, now, status, job_id))
        self._event(db, job_id, status, {"error": error} if error else {})

    def release(self, job_id: str, fence: int, reason: str) -> bool:
        """Give a running attempt back (its worker is shutting down): the job is queued again at once (or
        cancelled when a cancel was pending), so another worker, or this one after a restart, takes it without
        waiting for the lease to expire. Returns whether it was re-queued."""
        with self._transaction() as db:
            row = self._check_fence(db, job_id, fence)
            if row["cancel_requested"]:
                self._finish(db, job_id, "cancelled", None, None)
                return False
            db.execute("UPDATE jobs SET status = 'queued', stage = NULL, lease_until = NULL, updated = ? WHERE id = ?",
                       (time.time(), job_id))
            self._event(db, job_id, "requeued", {"reason": reason, "attempt": fence})
        return True

    def request_cancel(self, job_id: str) -> Job:
        """Idempotent: a queued job is cancelled at once, a running one becomes ``cancelling``."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                self._finish(db, job_id, "cancelled", None, None)
            elif row["status"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1, status = 'cancelling', updated = ? WHERE id = ?",
                           (time.time(), job_id))
                self._event(db, job_id, "cancelling", {})
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row)

    def reap(self, max_attempts: int) -> list[str]:
        """Jobs whose lease expired: re-queued (ids returned, to enqueue again) or, after ``max_attempts``,
        failed with ``worker_lost`` (cancelled when a cancel was pending)."""
        now = time.time()
        requeue = []
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempt, cancel_requested FROM jobs WHERE status IN ('running', "
                              "'cancelling') AND lease_until < ?", (now,)).fetchall()
            for row in rows:
                if row["cancel_requested"]:
                    self._finish(db, row["id"], "cancelled", None, None)
                elif row["attempt"] >= max_attempts:
                    self._finish(db, row["id"], "failed", None, {
                        "code": "worker_lost", "retryable": True,
                        "message": f"the worker stopped heartbeating {row['attempt']} times; giving up"})
                else:
                    db.execute("UPDATE jobs SET status = 'queued', stage = NULL, lease_until = NULL, updated = ? "
                               "WHERE id = ?", (now, row["id"]))
                    self._event(db, row["id"], "requeued", {"reason": "lease expired", "attempt": row["attempt"]})
                    requeue.append(row["id"])
        return requeue

    def queued_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._connection.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created").fetchall()]

    # -- registered model references ----------------------------------------------------------------------------
    def add_model(self, owner: str, record: dict[str, Any]) -> dict[str, Any]:
        model = {"id": "mdl-" + uuid.uuid4().hex[:16], "created": time.time(), **record}
        with self._transaction() as db:
            db.execute("INSERT INTO models (id, owner, record, created) VALUES (?, ?, ?, ?)",
                       (model["id"], owner, json.dumps(model), model["created"]))
        return model

    def get_model(self, owner: str, model_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._connection.execute("SELECT record FROM models WHERE id = ? AND owner = ?",
                                           (model_id, owner)).fetchone()
        return json.loads(row[0]) if row else None

    def list_model_records(self, owner: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._connection.execute("SELECT record FROM models WHERE owner = ? ORDER BY created",
                                            (owner,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- events -------------------------------------------------------------------------------------------------
    def _event(self, db: sqlite3.Connection, job_id: str, kind: str, data: dict[str, Any]) -> None:
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
        db.execute("INSERT INTO events (job_id, seq, at, kind, data) VALUES (?, ?, ?, ?, ?)",
                   (job_id, seq, time.time(), kind, json.dumps(data)))

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after, limit)).fetchall()
        return [Event(job_id=r["job_id"], seq=r["seq"], at=r["at"], kind=r["kind"], data=json.loads(r["data"]))
                for r in rows]


    # -- deletion and retention -------------------------------------------------------------------------------
    def delete(self, job_id: str) -> Job | None:
        """Remove a finished job with its events (``None`` when there is none); :class:`JobActive` while it is
        queued or running. Its artifact folders are the caller's to remove."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = job_from_row(row)
            if job.status not in TERMINAL:
                raise JobActive(job_id)
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job

    def drop_artifact(self, job_id: str, artifact_id: str) -> Job:
        """Remove one artifact from a succeeded job's result (its folder is the caller's to remove)."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            result = JobResult.from_dict(json.loads(row["result"]) if row["result"] else {}).without(artifact_id)
            db.execute("UPDATE jobs SET result = ?, updated = ? WHERE id = ?",
                       (json.dumps(result.to_dict()), time.time(), job_id))
            self._event(db, job_id, "artifact_deleted", {"artifact": artifact_id})
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row)

    def finished_before(self, before: float) -> list[str]:
        """Ids of finished jobs last changed before ``before`` (a retention sweep's candidates)."""
        marks = ",".join("?" * len(TERMINAL))
        with self._lock:
            rows = self._connection.execute(f"SELECT id FROM jobs WHERE status IN ({marks}) AND updated < ? "
                                            "ORDER BY updated", (*[s.value for s in TERMINAL], before)).fetchall()
        return [row["id"] for row in rows]


def make_store(data_dir: Path, redis_url: str | None) -> JobStore:
    """SQLite in the data folder (one machine), or Redis beside the queue (workers on several machines)."""
    if redis_url:
        from bitplan.service.redis_store import RedisJobStore

        return RedisJobStore(redis_url)
    return SqliteJobStore(data_dir / "jobs.db")
