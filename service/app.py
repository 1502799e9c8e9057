"""The FastAPI application: validates and records jobs, hands their ids to the queue, serves status, events and
artifacts. The pipeline itself runs in workers (``service.worker``), never in a request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitplan.service.schemas import (
    AllocationSummary,
    ArtifactFile,
    ArtifactPublic,
    ArtifactRef,
    ErrorInfo,
    EventPage,
    EventPublic,
    Health,
    JobCreate,
    JobPage,
    JobPublic,
    ModelCreate,
    ModelPublic,
    Problem,
    Progress,
)
from bitplan.service.store import TERMINAL, Job, make_store
from bitplan.service.worker import JobRunner, WorkerPool, WorkerSettings, enqueue, make_huey, register_runner
from fastapi import FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitplan import __version__
from bitplan.errors import BitplanError
from bitplan.models import BUNDLED_MODELS, resolve_reference, validate_gguf, validate_safetensors_header
from bitplan.spec import JobSpec

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
    lease_s: float = 30.0
    heartbeat_s: float = 2.0
    max_attempts: int = 3

    def worker_settings(self) -> WorkerSettings:
        return WorkerSettings(data_dir=self.data_dir, redis_url=self.redis_url, lease_s=self.lease_s,
                              heartbeat_s=self.heartbeat_s, max_attempts=self.max_attempts)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers)


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (400, 401, 404, 409, 413, 422, 429)}


def create_app(settings: ServiceSettings) -> FastAPI:
    store = make_store(settings.data_dir, settings.redis_url)
    worker_settings = settings.worker_settings()
    huey = make_huey(worker_settings)
    register_runner(huey, JobRunner(store, worker_settings))
    pool = WorkerPool(huey, store, worker_settings, workers=settings.workers) if settings.embedded_worker else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if pool is not None:
            pool.start()
        yield
        if pool is not None:
            pool.stop()

    app = FastAPI(title="bitplan", version=__version__, lifespan=lifespan,
                  description="Decide how many bits each part of a network gets, then quantize it.")
    app.state.store = store
    app.state.huey = huey
    app.state.settings = settings
    registry = CollectorRegistry()

    @app.exception_handler(RequestValidationError)
    async def readable_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = dict(error.headers or {})
        if error.status_code == 405:  # list every method of the path, not only the first route's
            methods = {m for route in app.routes if isinstance(route, APIRoute)
                       and route.path_regex.match(request.url.path) for m in route.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(status_code=error.status_code, content={"detail": error.detail}, headers=headers)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return JSONResponse(status_code=413, content={
                "detail": f"request body over the limit of {settings.max_body_bytes} bytes"})
        return await call_next(request)

    def owner_of(authorization: str | None) -> str:
        if not settings.api_keys:
            return LOCAL_OWNER
        if authorization is None or not authorization.startswith("Bearer "):
            raise _error(401, "this service needs an API key: send 'Authorization: Bearer KEY'",
                         {"WWW-Authenticate": "Bearer"})
        owner = settings.api_keys.get(hash_key(authorization.removeprefix("Bearer ").strip()))
        if owner is None:
            raise _error(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
        return owner

    def own_job(job_id: str, owner: str) -> Job:
        job = store.get(job_id)
        if job is None or job.owner != owner:
            raise _error(404, f"no job {job_id!r}")
        return job

    @app.get("/healthz", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health(status="ok", version=__version__)

    @app.get("/readyz", response_model=Health, tags=["meta"], responses={503: {"model": Problem}})
    def ready() -> Health:
        store.count_active("__readiness__")  # the database answers
        return Health(status="ready", version=__version__)

    requests_total = Counter("bitplan_http_requests", "HTTP requests by method and status", ["method", "status"],
                             registry=registry)
    jobs_gauge = Gauge("bitplan_jobs", "jobs by status", ["status"], registry=registry)
    queue_gauge = Gauge("bitplan_queue_pending", "messages waiting in the job queue", registry=registry)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        requests_total.labels(request.method, str(response.status_code)).inc()
        return response

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def metrics() -> PlainTextResponse:
        for status, count in store.status_counts().items():
            jobs_gauge.labels(status).set(count)
        queue_gauge.set(huey.pending_count())
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=list[ModelPublic], tags=["models"], responses=ERRORS)
    def list_models(authorization: str | None = Header(default=None)) -> list[ModelPublic]:
        """The bundled models, then the references this key registered."""
        owner = owner_of(authorization)
        return [bundled_public(m) for m in BUNDLED_MODELS] + [ModelPublic(**m)
                                                               for m in store.list_model_records(owner)]

    @app.post("/v1/models", status_code=201, response_model=ModelPublic, tags=["models"], responses=ERRORS)
    def register_model(body: ModelCreate, response: Response,
                       authorization: str | None = Header(default=None)) -> ModelPublic:
        owner = owner_of(authorization)
        reference = validate_reference(body.reference, settings)
        kind, path = resolve_reference(reference)
        size = None if reference in BUNDLED_MODELS else _reference_bytes(kind, path)
        model = store.add_model(owner, {"name": body.name, "reference": reference, "format": kind, "bytes": size})
        response.headers["Location"] = f"/v1/models/{model['id']}"
        return ModelPublic(**model)

    @app.get("/v1/models/{model_id}", response_model=ModelPublic, tags=["models"], responses=ERRORS)
    def get_model(model_id: str, authorization: str | None = Header(default=None)) -> ModelPublic:
        owner = owner_of(authorization)
        if model_id in BUNDLED_MODELS:
            return bundled_public(model_id)
        model = store.get_model(owner, model_id)
        if model is None:
            raise _error(404, f"no model {model_id!r}")
        return ModelPublic(**model)

    @app.post("/v1/jobs", status_code=202, response_model=JobPublic, tags=["jobs"], responses=ERRORS)
    def create_job(body: JobCreate, response: Response, authorization: str | None = Header(default=None),
                   idempotency_key: str | None = Header(default=None, max_length=200)) -> JobPublic:
        owner = owner_of(authorization)
        if body.model.startswith("mdl-"):
            registered = store.get_model(owner, body.model)
            if registered is None:
                raise _error(422, f"no registered model {body.model!r} for this key")
            body = body.model_copy(update={"model": registered["reference"]})
        request = validate_job(body, settings).to_dict()
        if store.count_active(owner) >= settings.max_active_jobs:
            existing = store.get_by_key(owner, idempotency_key) if idempotency_key else None
            if existing is None:
                raise _error(429, f"at most {settings.max_active_jobs} queued or running jobs per key; retry when "
                                  "one finishes", {"Retry-After": "30"})
        job, created = store.create(owner, request, idempotency_key)
        if not created and job.request != request:
            raise _error(409, f"Idempotency-Key {idempotency_key!r} was used for a different request (job "
                              f"{job.id})")
        if created:
            enqueue(huey, job.id)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job_public(job)

    @app.get("/v1/jobs", response_model=JobPage, tags=["jobs"], responses=ERRORS)
    def list_jobs(authorization: str | None = Header(default=None),
                  status: str | None = Query(default=None, pattern="^(queued|running|cancelling|succeeded|failed|"
                                                                   "cancelled)$"),
                  cursor: str | None = Query(default=None, max_length=200),
                  limit: int = Query(default=50, ge=1, le=200)) -> JobPage:
        owner = owner_of(authorization)
        after = _decode_cursor(cursor) if cursor else None
        jobs = store.list(owner, status=status, after=after, limit=limit + 1)
        next_cursor = f"{jobs[limit - 1].created!r}:{jobs[limit - 1].id}" if len(jobs) > limit else None
        return JobPage(items=[job_public(j) for j in jobs[:limit]], next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}", response_model=JobPublic, tags=["jobs"], responses=ERRORS)
    def get_job(job_id: str, authorization: str | None = Header(default=None)) -> JobPublic:
        return job_public(own_job(job_id, owner_of(authorization)))

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=JobPublic, tags=["jobs"],
              responses=ERRORS)
    def cancel_job(job_id: str, authorization: str | None = Header(default=None)) -> JobPublic:
        own_job(job_id, owner_of(authorization))
        return job_public(store.request_cancel(job_id))

    @app.get("/v1/jobs/{job_id}/events", response_model=EventPage, tags=["jobs"], responses=ERRORS)
    def job_events(job_id: str, authorization: str | None = Header(default=None),
                   after: int = Query(default=0, ge=0), limit: int = Query(default=100, ge=1, le=1000)) -> EventPage:
        own_job(job_id, owner_of(authorization))
        events = store.events(job_id, after=after, limit=limit)
        return EventPage(items=[EventPublic(seq=e.seq, at=e.at, kind=e.kind, data=e.data) for e in events],
                         next_after=events[-1].seq if events else after)

    @app.get("/v1/jobs/{job_id}/events/stream", tags=["jobs"], responses=ERRORS,
             response_class=StreamingResponse)
    async def job_event_stream(job_id: str, authorization: str | None = Header(default=None),
                               last_event_id: str | None = Header(default=None)) -> StreamingResponse:
        own_job(job_id, owner_of(authorization))
        start = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0

        async def stream() -> AsyncIterator[str]:
            after = start
            while True:
                events = store.events(job_id, after=after, limit=100)
                for event in events:
                    after = event.seq
                    yield f"id: {event.seq}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n"
                job = store.get(job_id)
                if not events and (job is None or job.status in TERMINAL):
                    return
                if not events:
                    yield ": keep-alive\n\n"
                    await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def own_artifact(artifact_id: str, owner: str) -> Path:
        job_id, _, index = artifact_id.rpartition("-")
        if not job_id or not index.isdigit():
            raise _error(404, f"no artifact {artifact_id!r}")
        job = own_job(job_id, owner)
        if job.status != "succeeded" or artifact_id not in {a["id"] for a in (job.result or {}).get("artifacts",
                                                                                                    [])}:
            raise _error(404, f"no artifact {artifact_id!r}")
        return settings.data_dir / "artifacts" / artifact_id

    @app.get("/v1/artifacts/{artifact_id}", response_model=ArtifactPublic, tags=["artifacts"], responses=ERRORS)
    def get_artifact(artifact_id: str, authorization: str | None = Header(default=None)) -> ArtifactPublic:
        folder = own_artifact(artifact_id, owner_of(authorization))
        manifest = json.loads((folder / "manifest.json").read_text())
        files = [ArtifactFile(name=name, bytes=(folder / name).stat().st_size, sha256=digest)
                 for name, digest in manifest["files"].items()]
        manifest_digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
        files.append(ArtifactFile(name="manifest.json", bytes=(folder / "manifest.json").stat().st_size,
                                  sha256=manifest_digest))
        return ArtifactPublic(id=artifact_id, job_id=artifact_id.rpartition("-")[0], manifest=manifest, files=files)

    file_responses: dict[int | str, dict[str, Any]] = {
        **ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "the file (ETag: its sha256)"},
        206: {"content": {"application/octet-stream": {}}, "description": "the requested byte range"}}

    @app.head("/v1/artifacts/{artifact_id}/files/{name}", tags=["artifacts"], responses=file_responses,
              response_class=FileResponse, operation_id="head_artifact_file")
    @app.get("/v1/artifacts/{artifact_id}/files/{name}", tags=["artifacts"], responses=file_responses,
             response_class=FileResponse, operation_id="get_artifact_file")
    def artifact_file(artifact_id: str, name: str, authorization: str | None = Header(default=None)) -> FileResponse:
        folder = own_artifact(artifact_id, owner_of(authorization))
        manifest = json.loads((folder / "manifest.json").read_text())
        digests = dict(manifest["files"])
        if name == "manifest.json":
            digests[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if name not in digests:  # only files the manifest lists: no path tricks
            raise _error(404, f"artifact {artifact_id!r} has no file {name!r}")
        return FileResponse(folder / name, media_type="application/octet-stream", filename=name,
                            headers={"ETag": f'"{digests[name]}"', "X-Checksum-Sha256": digests[name]})

    return app


def bundled_public(model_id: str) -> ModelPublic:
    model = BUNDLED_MODELS[model_id]
    return ModelPublic(id=model.id, name=model.description, reference=model.id, format="bundled", bytes=None,
                       created=0.0)


def _reference_bytes(kind: str, path: Path) -> int:
    if kind == "hf-folder":
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _decode_cursor(cursor: str) -> tuple[float, str]:
    created, _, job_id = cursor.partition(":")
    try:
        value = float(created)
    except ValueError:
        raise _error(400, f"malformed cursor {cursor!r}; pass next_cursor from the previous page") from None
    if not job_id or not math.isfinite(value):
        raise _error(400, f"malformed cursor {cursor!r}; pass next_cursor from the previous page")
    return value, job_id


def validate_job(body: JobCreate, settings: ServiceSettings) -> JobSpec:
    """Everything that can be checked before queueing: the model reference and the job spec (4xx otherwise)."""
    values = body.model_dump()
    budgets = values["bits_per_weight"]
    if isinstance(budgets, list) and len(budgets) > settings.max_sweep:
        raise _error(422, f"a sweep may have at most {settings.max_sweep} budgets, got {len(budgets)}")
    values["model"] = validate_reference(body.model, settings)
    try:
        return JobSpec.from_flat(**values)
    except BitplanError as error:
        raise _error(422, str(error)) from None


def validate_reference(reference: str, settings: ServiceSettings) -> str:
    """A bundled id, or a path inside an allowed root (symlinks resolved first), whose header is sound."""
    if reference in BUNDLED_MODELS:
        return reference
    if "://" in reference:
        raise _error(422, "model URLs are not fetched; give a bundled id or a path under an allowed root")
    if ".." in Path(reference).parts:
        raise _error(422, f"model path {reference!r} contains '..'; give a path inside an allowed root")
    if not settings.model_roots:
        raise _error(422, f"{reference!r} is not a bundled model ({', '.join(BUNDLED_MODELS)}) and this service "
                          "allows no model paths (start it with --model-root DIR)")
    path = Path(reference)
    resolved = path.resolve() if path.is_absolute() else None
    candidates = [resolved] if resolved is not None else [(root / path).resolve() for root in settings.model_roots]
    roots = [root.resolve() for root in settings.model_roots]
    inside = [c for c in candidates if c is not None and any(c.is_relative_to(r) for r in roots)]
    if not inside:
        raise _error(422, f"model path {reference!r} is outside the allowed roots")
    target = inside[0]
    try:
        kind, file = resolve_reference(str(target))
        size = _reference_bytes(kind, file)
        if size > settings.max_model_bytes:
            raise _error(413, f"model is {size} bytes, over this service's limit of {settings.max_model_bytes}")
        if kind == "gguf":
            validate_gguf(file)
        else:
            for weights in ([file] if kind == "safetensors" else sorted(file.glob("*.safetensors"))):
                validate_safetensors_header(weights)
    except BitplanError as error:
        raise _error(422, str(error)) from None
    return str(target)


def job_public(job: Job) -> JobPublic:
    eta = None
    if job.status == "running" and job.started is not None and job.progress > 0.02:
        elapsed = time.time() - job.started
        eta = max(0.0, elapsed * (1 - job.progress) / job.progress)
    result = job.result or {}
    runs = result.get("runs", [])
    allocation = []
    for run in runs:
        histogram: dict[str, int] = {}
        for unit in run["units"]:
            histogram[str(unit["bits"])] = histogram.get(str(unit["bits"]), 0) + 1
        allocation.append(AllocationSummary(bits_per_weight=run["bits_per_weight"], bytes=run["bytes"],
                                            status=run["status"], objective=run["objective"],
                                            lower_bound=run["lower_bound"], kl_divergence=run.get("kl_divergence"),
                                            bits_histogram=histogram))
    return JobPublic(id=job.id, status=job.status,  # type: ignore[arg-type]
                     progress=Progress(stage=job.stage, fraction=job.progress, eta_s=eta), attempt=job.attempt,
                     error=ErrorInfo(**job.error) if job.error else None,
                     artifacts=[ArtifactRef(**a) for a in result.get("artifacts", [])], allocation=allocation,
                     request=job.request, created=job.created, updated=job.updated)


def default_app() -> FastAPI:
    """An API-only app for ``uvicorn --factory service.app:default_app``: data in ``$BITPLAN_DATA_DIR`` (default
    ``~/.local/share/bitplan``), jobs run by ``bitplan worker`` processes."""
    import os

    data = Path(os.environ.get("BITPLAN_DATA_DIR", Path.home() / ".local" / "share" / "bitplan"))
    return create_app(ServiceSettings(data_dir=data, embedded_worker=False))
