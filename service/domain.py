"""The service's domain: job statuses, the stored job and its events, the typed job result, and the
:class:`JobStore` protocol that both stores (SQLite, Redis) implement."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class JobStatus(StrEnum):
    """A job's status, as it crosses the API; prints as its value (``f"{JobStatus.QUEUED}"`` is ``queued``)."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)
LEASED = (JobStatus.RUNNING, JobStatus.CANCELLING)  # an attempt holds a lease
STATUSES = tuple(s.value for s in JobStatus)  # plain strings: dict keys, SQL values


@dataclass(frozen=True)
class Job:
    """One job as stored; ``request`` is the job spec's ``to_dict()``, ``result`` a :class:`JobResult`'s."""

    id: str
    owner: str
    idempotency_key: str | None
    request: dict[str, Any]
    status: str
    stage: str | None
    progress: float
    attempt: int
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    created: float
    updated: float
    started: float | None
    lease_until: float | None
    cancel_requested: bool
    eta_at: float | None = None  # while running: when the worker predicts the job ends (from measured rates)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", JobStatus(self.status))

    def outcome(self) -> JobResult:
        """The typed result (empty until the job succeeded)."""
        return JobResult.from_dict(self.result or {})


@dataclass(frozen=True)
class Event:
    """One event of a job: ``seq`` counts from 1 per job."""

    job_id: str
    seq: int
    at: float
    kind: str
    data: dict[str, Any]


class StaleAttempt(Exception):
    """A write carried a fencing token older than the job's current attempt."""


class TooManyJobs(Exception):
    """The owner already has its maximum of queued and running jobs."""


class JobActive(Exception):
    """A job that is still queued or running cannot be deleted (cancel it first)."""


@dataclass(frozen=True)
class ArtifactRecord:
    """One published artifact of a job."""

    id: str
    bits_per_weight: float
    bytes: int
    manifest_sha256: str


@dataclass(frozen=True)
class JobResult:
    """What a succeeded job published: its artifacts, and each run's report (the CLI's run JSON)."""

    artifacts: list[ArtifactRecord] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"artifacts": [asdict(a) for a in self.artifacts], "runs": self.runs}

    def without(self, artifact_id: str) -> JobResult:
        """This result less one artifact and its run's report (a deleted artifact)."""
        return JobResult(artifacts=[a for a in self.artifacts if a.id != artifact_id],
                         runs=[r for r in self.runs if r.get("artifact") != artifact_id])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        return cls(artifacts=[ArtifactRecord(**a) for a in data.get("artifacts", [])], runs=list(data.get("runs", [])))


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable code, a message for people, and whether a retry may succeed."""

    code: str
    message: str
    retryable: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class JobStore(Protocol):
    """Job records, their events and registered models, with leases and fencing tokens. Every change to a running
    job carries its fence (the attempt number); a stale one raises :class:`StaleAttempt`."""

    def close(self) -> None: ...
    def create(self, owner: str, request: dict[str, Any], idempotency_key: str | None, *,
               max_active: int | None = None) -> tuple[Job, bool]: ...
    def get(self, job_id: str) -> Job | None: ...
    def get_by_key(self, owner: str, idempotency_key: str) -> Job | None: ...
    def list(self, owner: str, *, status: str | None = None, after: tuple[float, str] | None = None,
             limit: int = 50) -> list[Job]: ...
    def status_counts(self) -> dict[str, int]: ...
    def count_active(self, owner: str) -> int: ...
    def claim(self, job_id: str, lease_s: float) -> int | None: ...
    def heartbeat(self, job_id: str, fence: int, lease_s: float) -> bool: ...
    def progress(self, job_id: str, fence: int, stage: str, fraction: float, detail: dict[str, Any],
                 eta_at: float | None = None) -> None: ...
    def finish(self, job_id: str, fence: int, status: str, *, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None: ...
    def release(self, job_id: str, fence: int, reason: str) -> bool: ...
    def request_cancel(self, job_id: str) -> Job: ...
    def reap(self, max_attempts: int) -> list[str]: ...
    def queued_ids(self) -> list[str]: ...
    def add_model(self, owner: str, record: dict[str, Any]) -> dict[str, Any]: ...
    def get_model(self, owner: str, model_id: str) -> dict[str, Any] | None: ...
    def list_model_records(self, owner: str) -> list[dict[str, Any]]: ...
    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> list[Event]: ...
    def delete(self, job_id: str) -> Job | None: ...
    def drop_artifact(self, job_id: str, artifact_id: str) -> Job: ...
    def finished_before(self, before: float) -> list[str]: ...
