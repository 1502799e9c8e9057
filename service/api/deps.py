"""Dependencies of the routes: the service's settings and store, and the caller's identity (API key -> owner)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPBearer

from bitplan.service.api.errors import http_error
from bitplan.service.domain import Job, JobStore
from bitplan.service.storage import Storage

LOCAL_OWNER = "local"


@dataclass
class ServiceSettings:
    """Everything the service is configured with (``bitplan serve`` fills it from flags)."""

    data_dir: Path
    model_roots: list[Path] = field(default_factory=list)  # folders whose files may be referenced by path
    api_keys: dict[str, str] = field(default_factory=dict)  # sha256(key) -> owner; empty: one local owner
    embedded_worker: bool = True
    workers: int = 1
    redis_url: str | None = None
    max_body_bytes: int = 64 * 1024
    max_active_jobs: int = 4  # per owner, queued + running
    max_sweep: int = 8
    max_model_bytes: int = 20 * 2**30
    min_free_bytes: int = 64 * 2**20  # /readyz is not ready below this much free space in the data folder
    public_metrics: bool = False  # /metrics without a key even when the service has API keys
    lease_s: float = 30.0
    heartbeat_s: float = 2.0
    max_attempts: int = 3
    retention_days: float | None = None  # finished jobs unchanged this long are deleted with their artifacts
    retention_sweep_s: float = 600.0  # how often the retention sweep runs
    store_url: str | None = None  # artifacts and job inputs: the data folder (None), a folder, or s3://bucket/prefix
    model_cache_bytes: int = 20 * 2**30  # an embedded worker's cache of models pulled from an object store

    def worker_settings(self) -> Any:
        from bitplan.service.worker import WorkerSettings

        return WorkerSettings(data_dir=self.data_dir, redis_url=self.redis_url, lease_s=self.lease_s,
                              heartbeat_s=self.heartbeat_s, max_attempts=self.max_attempts, store_url=self.store_url,
                              model_cache_bytes=self.model_cache_bytes)


def hash_key(key: str) -> str:
    """How an API key is held: its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_store(request: Request) -> JobStore:
    return request.app.state.store  # type: ignore[no-any-return]


def get_huey(request: Request) -> Any:
    return request.app.state.huey


def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


Settings = Annotated[ServiceSettings, Depends(get_settings)]
Store = Annotated[JobStore, Depends(get_store)]
Queue = Annotated[Any, Depends(get_huey)]
Files = Annotated[Storage, Depends(get_storage)]  # where artifacts and job inputs live


BEARER = HTTPBearer(auto_error=False, description="an API key from the service's --api-keys file (none needed when "
                    "the service has no keys)")


def caller(settings: Settings, authorization: str | None = Header(default=None),
           _: Any = Security(BEARER)) -> str:
    """The owner the request's API key belongs to (the one local owner when the service has no keys). ``BEARER``
    only documents the scheme in the OpenAPI document; the header is read here, with the service's messages."""
    if not settings.api_keys:
        return LOCAL_OWNER
    scheme, _, key = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():  # the scheme is case-insensitive (RFC 9110)
        raise http_error(401, "this service needs an API key: send 'Authorization: Bearer KEY'",
                         {"WWW-Authenticate": "Bearer"})
    owner = settings.api_keys.get(hash_key(key.strip()))
    if owner is None:
        raise http_error(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
    return owner


Owner = Annotated[str, Depends(caller)]


def own_job(job_id: str, owner: str, store: JobStore) -> Job:
    """The caller's job, or a 404 (another owner's job does not exist for this caller)."""
    job = store.get(job_id)
    if job is None or job.owner != owner:
        raise http_error(404, f"no job {job_id!r}")
    return job


def metrics_caller(settings: Settings, authorization: str | None = Header(default=None)) -> None:
    """``/metrics`` needs a key when the service has keys, unless it was started with public metrics."""
    if settings.api_keys and not settings.public_metrics:
        caller(settings, authorization)
