"""``/v1/jobs``: create (validated into a job spec before anything is queued), list, read, cancel, events."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from bitplan.allocator.frontier import FrontierTooLarge
from bitplan.errors import CursorError, SpecError
from bitplan.job.streamed_job import preflight
from bitplan.report.frontier import API_POINT_LIMIT, PROBLEM_FILE, NoTimes, frontier_csv, job_frontier
from bitplan.service.api.deps import Files, Owner, Queue, ServiceSettings, Settings, Store, own_job
from bitplan.service.api.errors import ERRORS, http_error
from bitplan.service.api.pagination import CURSOR, one_page
from bitplan.service.api.routes.latency import table_path
from bitplan.service.domain import TERMINAL, Job, JobActive, JobStatus, JobStore, TooManyJobs
from bitplan.service.retention import delete_job
from bitplan.service.schemas import (
    AllocationSummary,
    ArtifactRef,
    ArtifactsCreate,
    ErrorInfo,
    EventPage,
    EventPublic,
    FrontierPublic,
    JobCreate,
    JobPage,
    JobPublic,
    Progress,
)
from bitplan.service.storage import Storage
from bitplan.service.worker import enqueue
from bitplan.sources.references import check_reference, check_text_file
from bitplan.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)
STATUS_PATTERN = "^(" + "|".join(s.value for s in JobStatus) + ")$"
MAX_SEQ = 2**53  # event sequence numbers stay below this (integers every store and JSON client holds exactly)


def validate_job(body: JobCreate, settings: ServiceSettings, owner: str) -> JobSpec:
    """Everything that can be checked before queueing: the model reference and the job spec (4xx otherwise)."""
    values = body.model_dump()
    if values.get("latency_table") is not None:  # an uploaded table's id -> its stored file
        values["latency_table"] = str(table_path(settings, owner, values["latency_table"]))
    budgets = values["bits_per_weight"]
    if isinstance(budgets, list) and len(budgets) > settings.max_sweep:
        raise http_error(422, f"a sweep may have at most {settings.max_sweep} budgets, got {len(budgets)}")
    values["model"] = check_reference(body.model, roots=settings.model_roots, max_bytes=settings.max_model_bytes)
    if values.get("eval_text") is not None:
        values["eval_text"] = check_text_file(values["eval_text"], roots=settings.model_roots, param="eval_text")
    spec = JobSpec.from_flat(**values)
    if settings.embedded_worker or spec.sensitivity.max_memory is not None:
        # A streamed job over its memory cap: a 422 saying what would fit, not a failure in the worker. The default
        # cap is this machine's, so without an explicit cap only an embedded worker (this machine) plans here.
        preflight(spec)
    return spec


@router.post("", status_code=202, response_model=JobPublic)
def create_job(body: JobCreate, response: Response, owner: Owner, store: Store, settings: Settings, huey: Queue,
               files: Files, idempotency_key: str | None = Header(default=None, max_length=200)) -> JobPublic:
    """Validate and queue a job. With an object store, its model and input files are pushed there first (named
    by their content: a model already there is not sent again), so that a worker on another machine can pull them."""
    if body.model.startswith("mdl-"):
        registered = store.get_model(owner, body.model)
        if registered is None:
            raise http_error(422, f"no registered model {body.model!r} for this key")
        body = body.model_copy(update={"model": registered["reference"]})
    request = files.push_inputs(validate_job(body, settings, owner).to_dict())
    return submit(request, owner, store, settings, huey, response, idempotency_key)


def submit(request: dict[str, Any], owner: str, store: JobStore, settings: ServiceSettings, huey: Any,
           response: Response, idempotency_key: str | None) -> JobPublic:
    """Store and queue a validated job request (the same request under the same key: the same job)."""
    try:
        job, created = store.create(owner, request, idempotency_key, max_active=settings.max_active_jobs)
    except TooManyJobs:
        raise http_error(429, f"at most {settings.max_active_jobs} queued or running jobs per key; retry when one "
                              "finishes", {"Retry-After": "30"}) from None
    if not created and not same_request(job.request, request):
        raise http_error(409, f"Idempotency-Key {idempotency_key!r} was used for a different request (job "
                              f"{job.id})")
    if created:
        enqueue(huey, job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job)


def same_request(stored: dict[str, Any], request: dict[str, Any]) -> bool:
    """Whether a stored job's request is ``request``, reading the stored one as the spec reads it: a record from
    before an upgrade lacks the newer options, at their defaults, and the same POST retried after the upgrade with
    the same Idempotency-Key is still the same job, not a 409."""
    try:
        return JobSpec.from_dict(stored).to_dict() == request
    except SpecError:  # a record this bitplan cannot read at all differs from any request it made
        return stored == request


@router.get("", response_model=JobPage)
def list_jobs(owner: Owner, store: Store, status: str | None = Query(default=None, pattern=STATUS_PATTERN),
              cursor: str | None = CURSOR, limit: int = Query(default=50, ge=1, le=200)) -> JobPage:
    """This key's jobs, oldest first (one page)."""
    after = _decode_cursor(cursor) if cursor else None
    page = one_page(store.list(owner, status=status, after=after, limit=limit + 1), limit,
                    lambda job: f"{job.created!r}:{job.id}")
    return JobPage(**{**page, "items": [job_public(j) for j in page["items"]]})


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, owner: Owner, store: Store) -> JobPublic:
    return job_public(own_job(job_id, owner, store))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel_job(job_id: str, owner: Owner, store: Store) -> JobPublic:
    """Cancel a queued or running job; cancelling a cancelled job again is a no-op, a finished one a 409."""
    job = own_job(job_id, owner, store)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise http_error(409, f"job {job_id!r} already {job.status.value}; there is nothing to cancel")
    return job_public(store.request_cancel(job_id))


@router.delete("/{job_id}", status_code=204, response_class=Response)
def delete_job_route(job_id: str, owner: Owner, store: Store, files: Files) -> Response:
    """Delete a finished job, its events and its artifacts (their files and disk space); a queued or running job
    is a 409 (cancel it first)."""
    own_job(job_id, owner, store)
    try:
        delete_job(store, files, job_id)
    except JobActive:
        raise http_error(409, f"job {job_id!r} is still queued or running: cancel it first (POST "
                              f"/v1/jobs/{job_id}/cancel), then delete it once it is cancelled") from None
    return Response(status_code=204)


@router.get("/{job_id}/frontier", response_model=FrontierPublic,
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                             "description": "the frontier (JSON, or CSV with ?format=csv)"}})
def job_frontier_route(job_id: str, owner: Owner, store: Store, files: Files,
                       format: str = Query(default="json", pattern="^(json|csv)$"),
                       kind: str = Query(default="auto", pattern="^(auto|exact|hull)$"),
                       limit: int = Query(default=API_POINT_LIMIT, ge=2, le=100_000),
                       axis: str = Query(default="bytes", pattern="^(bytes|latency|prefill)$")) -> Any:
    """The predicted quality-against-size frontier of a succeeded job, its uniform baselines and its measured
    artifacts (``kind``: ``exact`` Pareto points, ``hull`` breakpoints, ``auto`` exact while small; at most
    ``limit`` points, evenly spread, of ``total_points``). ``axis=latency`` (or ``prefill``): quality against
    predicted decode (prefill) milliseconds per token, for a job that had a latency budget (the hull's
    breakpoints, each with its bytes)."""
    job = own_job(job_id, owner, store)
    document = _problem_document(job, files)
    try:
        report = job_frontier(document, job.outcome().runs, kind=kind, limit=limit, axis=axis)
    except FrontierTooLarge as error:
        raise http_error(422, f"{error}; ask for kind=hull or kind=auto") from None
    except NoTimes as error:
        raise http_error(409, str(error)) from None
    except ValueError as error:
        raise http_error(422, str(error)) from None
    if format == "csv":
        return Response(frontier_csv(report), media_type="text/csv")
    return FrontierPublic(job_id=job.id, **report)


@router.post("/{job_id}/artifacts", status_code=202, response_model=JobPublic)
def more_artifacts(job_id: str, body: ArtifactsCreate, response: Response, owner: Owner, store: Store,
                   settings: Settings, huey: Queue, files: Files,
                   idempotency_key: str | None = Header(default=None, max_length=200)) -> JobPublic:
    """Materialise more budgets of a succeeded job: a new job with its spec and these budgets, whose sensitivity
    pass comes from the cache (its calibration record says ``"sensitivity_cache": "hit"``)."""
    job = own_job(job_id, owner, store)
    _problem_document(job, files)  # a job that planned from a sensitivity pass, and succeeded
    if (body.bits_per_weight is None) == (body.bytes is None):
        raise http_error(422, "give exactly one of bits_per_weight (one or more budgets) or bytes")
    budgets = body.bits_per_weight if isinstance(body.bits_per_weight, list) else [body.bits_per_weight]
    if body.bits_per_weight is not None and not 1 <= len(budgets) <= settings.max_sweep:
        raise http_error(422, f"give 1 to {settings.max_sweep} budgets, got {len(budgets)}")
    spec = JobSpec.from_dict(job.request).replace(bits_per_weight=budgets if body.bytes is None else (),
                                                  bytes=body.bytes, uniform_bits=None)
    return submit(spec.to_dict(), owner, store, settings, huey, response, idempotency_key)


def _problem_document(job: Job, files: Storage) -> dict[str, Any]:
    """The allocation problem the job's first artifact carries, or a 409 saying why there is none."""
    if job.status != JobStatus.SUCCEEDED:
        raise http_error(409, f"job {job.id!r} is {job.status.value}; its frontier exists once it has succeeded")
    artifacts = job.outcome().artifacts
    if not artifacts:
        raise http_error(409, f"job {job.id!r} has no artifacts left (they were deleted): it has no frontier")
    raw = files.read(artifacts[0].id, job.attempt, PROBLEM_FILE)  # every artifact: the same problem
    if raw is None:
        raise http_error(409, f"job {job.id!r} solved no allocation (uniform bits): it has no frontier")
    return json.loads(raw)  # type: ignore[no-any-return]


@router.get("/{job_id}/events", response_model=EventPage)
def job_events(job_id: str, owner: Owner, store: Store, cursor: str | None = CURSOR,
               after: int | None = Query(default=None, ge=0, le=MAX_SEQ, description="the same as cursor: the "
                                         "sequence number of the last event seen (kept for older callers)"),
               limit: int = Query(default=100, ge=1, le=1000)) -> EventPage:
    """The job's events in order (one page); an event's cursor is its ``seq``."""
    own_job(job_id, owner, store)
    if cursor is not None and after is not None:
        raise http_error(422, "give cursor or after, not both (they mean the same)")
    start = after or 0
    if cursor is not None:
        if not (cursor.isascii() and cursor.isdigit() and int(cursor[:20]) <= MAX_SEQ):
            raise CursorError(cursor)
        start = int(cursor)
    page = one_page(store.events(job_id, after=start, limit=limit + 1), limit, lambda event: str(event.seq))
    return EventPage(**{**page, "items": [EventPublic(seq=e.seq, at=e.at, kind=e.kind, data=e.data)
                                          for e in page["items"]]})


@router.get("/{job_id}/events/stream", response_class=StreamingResponse)
async def job_event_stream(job_id: str, owner: Owner, store: Store,
                           last_event_id: str | None = Header(default=None)) -> StreamingResponse:
    own_job(job_id, owner, store)
    digits = last_event_id is not None and last_event_id.isascii() and last_event_id.isdigit()
    start = min(int(last_event_id[:40]) if digits else 0, MAX_SEQ)  # type: ignore[index]

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


def _decode_cursor(cursor: str) -> tuple[float, str]:
    created, _, job_id = cursor.partition(":")
    try:
        value = float(created)
    except ValueError:
        value = math.nan
    if not job_id or not math.isfinite(value):
        raise CursorError(cursor)
    return value, job_id


def _allocation(run: dict[str, Any]) -> AllocationSummary:
    histogram: dict[str, int] = {}
    for unit in run["units"]:
        histogram[str(unit["bits"])] = histogram.get(str(unit["bits"]), 0) + 1
    return AllocationSummary(bits_per_weight=run["bits_per_weight"], bytes=run["bytes"], status=run["status"],
                             objective=run["objective"], lower_bound=run["lower_bound"],
                             kl_divergence=run.get("kl_divergence"), bits_histogram=histogram,
                             quality=run.get("quality"), latency=run.get("latency"))


def job_public(job: Job) -> JobPublic:
    """A stored job as the API shows it (progress with the worker's ETA from measured rates; a job stored by an
    older worker: from the elapsed time)."""
    eta = None
    if job.status == JobStatus.RUNNING and job.eta_at is not None:
        eta = max(0.0, job.eta_at - time.time())
    elif job.status == JobStatus.RUNNING and job.started is not None and job.progress > 0.02:
        elapsed = time.time() - job.started
        eta = max(0.0, elapsed * (1 - job.progress) / job.progress)
    outcome = job.outcome()
    return JobPublic(id=job.id, status=job.status, progress=Progress(stage=job.stage, fraction=job.progress, eta_s=eta),
                     attempt=job.attempt, error=ErrorInfo(**job.error) if job.error else None,
                     artifacts=[ArtifactRef(**vars(a)) for a in outcome.artifacts],
                     allocation=[_allocation(run) for run in outcome.runs], request=job.request, created=job.created,
                     updated=job.updated)
