"""One place that turns errors into HTTP responses, all as RFC 9457 problem details (``application/problem+json``
with ``type``, ``title``, ``status``, ``detail``, a stable ``code`` and the offending ``param``): the
:class:`~bitplan.errors.BitplanError` family (each class carries its status and code), request validation errors
and HTTP errors. A message never carries the server's own paths."""

from __future__ import annotations

import errno
import http
import logging
import sqlite3
from pathlib import Path
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitplan.errors import BitplanError
from bitplan.service.objects import ObjectStoreUnavailable
from bitplan.service.schemas import Problem

logger = logging.getLogger(__name__)
PROBLEM_TYPE = "application/problem+json"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    for code in (400, 401, 404, 409, 413, 422, 429, 503)}  # 503: Redis or the object store unreachable
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "too_large", 416: "range_not_satisfiable",
                422: "invalid_input", 429: "too_many_jobs", 503: "unavailable", 507: "insufficient_storage"}


def http_error(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    """An HTTP error for a route to raise."""
    return HTTPException(status_code=status, detail=detail, headers=headers)


def problem(status: int, detail: str, *, code: str | None = None, param: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem-details response."""
    code = code or STATUS_CODES.get(status, "error")
    body = Problem(type=f"urn:bitplan:problem:{code}", title=http.HTTPStatus(status).phrase, status=status,
                   detail=detail, code=code, param=param)
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers, media_type=PROBLEM_TYPE)


def _without_server_paths(request: Request, message: str) -> str:
    """Root-relative paths in place of the service's own folders (a caller names models relative to a root)."""
    settings = request.app.state.settings
    for folder in [*settings.model_roots, settings.data_dir]:
        for form in {str(Path(folder)), str(Path(folder).resolve())}:
            message = message.replace(form.rstrip("/") + "/", "")
    return message


def infrastructure_problem(error: BaseException) -> JSONResponse | None:
    """503 (store unreachable, busy) or 507 (disk full) for an error of the service's own infrastructure, with
    ``Retry-After``; ``None`` for anything else."""
    text = str(error).lower()
    if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return problem(503, "the job store (Redis) cannot be reached; retry shortly", code="store_unavailable",
                       headers={"Retry-After": "5"})
    if isinstance(error, ObjectStoreUnavailable):
        return problem(503, "the object store that holds models and artifacts cannot be reached; retry shortly",
                       code="object_store_unavailable", headers={"Retry-After": "5"})
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "disk is full" in text \
        or "disk full" in text
    if full and isinstance(error, (OSError, sqlite3.Error, redis.exceptions.ResponseError)):
        return problem(507, "the service's data folder or store is out of space; retry once space is freed",
                       code="insufficient_storage", headers={"Retry-After": "60"})
    if isinstance(error, sqlite3.OperationalError):
        return problem(503, "the job store is busy or unavailable; retry shortly", code="store_unavailable",
                       headers={"Retry-After": "5"})
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        response = infrastructure_problem(error)
        if response is not None:
            return response
        logger.error("unexpected error", exc_info=error)
        return problem(500, "internal error; it has been logged", code="internal")

    for kind in (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError,
                 ObjectStoreUnavailable, sqlite3.Error, OSError, Exception):  # infrastructure first: answered
        app.add_exception_handler(kind, unexpected)  # type: ignore[arg-type]

    @app.exception_handler(BitplanError)
    async def bad_input(request: Request, error: BitplanError) -> JSONResponse:
        return problem(error.status, _without_server_paths(request, str(error)), code=error.code, param=error.param)

    @app.exception_handler(RequestValidationError)
    async def readable_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors]
        param = str(errors[0]["loc"][-1]) if errors and errors[0].get("loc") else None
        return problem(422, "; ".join(parts), code="invalid_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = dict(error.headers or {})
        if error.status_code == 405:  # list every method of the path, not only the first route's
            methods = {m for route in app.routes if isinstance(route, APIRoute)
                       and route.path_regex.match(request.url.path) for m in route.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return problem(error.status_code, str(error.detail), headers=headers)
