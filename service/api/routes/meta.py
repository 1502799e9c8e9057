"""Probes and metrics: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bitplan import __version__
from bitplan.service.api.deps import Queue, Store
from bitplan.service.schemas import Health, Problem

router = APIRouter(tags=["meta"])


@router.get("/healthz", response_model=Health)
def health() -> Health:
    return Health(status="ok", version=__version__)


@router.get("/readyz", response_model=Health, responses={503: {"model": Problem}})
def ready(store: Store) -> Health:
    store.count_active("__readiness__")  # the database answers
    return Health(status="ready", version=__version__)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request, store: Store, huey: Queue) -> PlainTextResponse:
    telemetry = request.app.state.telemetry
    for status, count in store.status_counts().items():
        telemetry.jobs.labels(status).set(count)
    telemetry.queue.set(huey.pending_count())
    return PlainTextResponse(generate_latest(telemetry.registry).decode(), media_type=CONTENT_TYPE_LATEST)
