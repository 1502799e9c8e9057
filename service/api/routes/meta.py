"""Probes and metrics: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bitplan import __version__
from bitplan.service.api.deps import Queue, Settings, Store, metrics_caller
from bitplan.service.api.errors import problem
from bitplan.service.schemas import Health, Problem

router = APIRouter(tags=["meta"])


@router.get("/healthz", response_model=Health)
def health() -> Health:
    return Health(status="ok", version=__version__)


@router.get("/readyz", response_model=Health, responses={503: {"model": Problem}})
def ready(store: Store, settings: Settings) -> Health | JSONResponse:
    """Ready when the job store answers and the data folder has room for a job's records and artifacts."""
    try:
        store.count_active("__readiness__")
    except Exception as error:  # noqa: BLE001 - whatever the store raises, the service is not ready
        backend = "Redis" if settings.redis_url else "SQLite"
        return problem(503, f"not ready: the job store ({backend}) does not answer ({type(error).__name__})",
                       code="store_unavailable", headers={"Retry-After": "5"})
    free = shutil.disk_usage(settings.data_dir).free if settings.data_dir.exists() else None
    if free is not None and free < settings.min_free_bytes:
        return problem(503, f"not ready: the data folder has {free} bytes free, under the {settings.min_free_bytes} "
                            "a job needs", code="insufficient_storage", headers={"Retry-After": "60"})
    return Health(status="ready", version=__version__)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request, store: Store, huey: Queue, _: None = Depends(metrics_caller)) -> PlainTextResponse:
    telemetry = request.app.state.telemetry
    for status, count in store.status_counts().items():
        telemetry.jobs.labels(status).set(count)
    telemetry.queue.set(huey.pending_count())
    return PlainTextResponse(generate_latest(telemetry.registry).decode(), media_type=CONTENT_TYPE_LATEST)
