"""The FastAPI application: the routers of ``bitplan.service.api`` over one store and one queue, with the body
limit, request counting and the error handlers. The pipeline itself runs in workers (``bitplan.service.worker``),
never in a request."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitplan import __version__
from bitplan.service.api.deps import LOCAL_OWNER, ServiceSettings, hash_key
from bitplan.service.api.errors import install_error_handlers, problem
from bitplan.service.api.routes import artifacts, jobs, latency, meta, models
from bitplan.service.retention import RetentionSweeper
from bitplan.service.storage import Storage
from bitplan.service.store import make_store
from bitplan.service.worker import JobRunner, WorkerPool, make_huey, register_runner

DASHBOARD = Path(__file__).with_name("static")
__all__ = ["LOCAL_OWNER", "ServiceSettings", "create_app", "default_app", "hash_key"]


@dataclass(frozen=True)
class Telemetry:
    """The Prometheus registry and the service's metrics."""

    registry: CollectorRegistry
    requests: Counter
    jobs: Gauge
    queue: Gauge

    @classmethod
    def create(cls) -> Telemetry:
        registry = CollectorRegistry()
        return cls(registry=registry,
                   requests=Counter("bitplan_http_requests", "HTTP requests by method and status",
                                    ["method", "status"], registry=registry),
                   jobs=Gauge("bitplan_jobs", "jobs by status", ["status"], registry=registry),
                   queue=Gauge("bitplan_queue_pending", "messages waiting in the job queue", registry=registry))


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service over ``settings``: its store and queue, an embedded worker pool unless disabled."""
    store = make_store(settings.data_dir, settings.redis_url)
    storage = Storage(settings.data_dir, settings.store_url, model_cache_bytes=settings.model_cache_bytes)
    worker_settings = settings.worker_settings()
    huey = make_huey(worker_settings)
    runner = JobRunner(store, worker_settings, storage)
    register_runner(huey, runner)
    pool = (WorkerPool(huey, store, worker_settings, workers=settings.workers, runner=runner)
            if settings.embedded_worker else None)

    sweeper = None if settings.retention_days is None else RetentionSweeper(
        store, storage, settings.retention_days * 86400.0, settings.retention_sweep_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if pool is not None:
            pool.start()
        if sweeper is not None:
            sweeper.start()
        yield
        if sweeper is not None:
            sweeper.stop()
        if pool is not None:
            pool.stop()

    app = FastAPI(title="bitplan", version=__version__, lifespan=lifespan,
                  description="Decide how many bits each part of a network gets, then quantize it.",
                  generate_unique_id_function=lambda route: route.name)  # operationIds: create_job, get_job, ...
    app.state.store, app.state.huey, app.state.settings, app.state.storage = store, huey, settings, storage
    app.state.sweeper = sweeper
    app.state.telemetry = Telemetry.create()
    install_error_handlers(app)
    _install_middleware(app, settings, app.state.telemetry)
    for router in (meta.router, models.router, jobs.router, artifacts.router, latency.router):
        app.include_router(router)
    _install_dashboard(app)
    _optional_auth_in_schema(app)
    return app


def _optional_auth_in_schema(app: FastAPI) -> None:
    """The OpenAPI document says the bearer key is optional (``security: [{HTTPBearer: []}, {}]``): a service
    started without keys serves everyone, one with keys answers 401 without one."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    if isinstance(operation, dict) and operation.get("security") and {} not in operation["security"]:
                        operation["security"].append({})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_dashboard(app: FastAPI) -> None:
    """The dashboard: static files shipped in this package (no build step, no network), at ``/ui/``; ``/``
    redirects there. The page is a client of ``/v1`` like any other."""
    app.mount("/ui", StaticFiles(directory=DASHBOARD, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)


def _install_middleware(app: FastAPI, settings: ServiceSettings, telemetry: Telemetry) -> None:
    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        telemetry.requests.labels(request.method, str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with a 413: by its Content-Length up front, and by counting what
    arrives (a chunked body has no length) before the app sees any of it, so at most ``max_bytes`` is held."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = problem(413, f"request body over the limit of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await too_large(scope, receive, send)
            return
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def default_app() -> FastAPI:
    """An API-only app for ``uvicorn --factory bitplan.service.app:default_app``: data in ``$BITPLAN_DATA_DIR``
    (default ``~/.local/share/bitplan``), jobs run by ``bitplan worker`` processes."""
    data = Path(os.environ.get("BITPLAN_DATA_DIR", Path.home() / ".local" / "share" / "bitplan"))
    return create_app(ServiceSettings(data_dir=data, embedded_worker=False))
