"""One place that turns errors into HTTP responses: the :class:`~bitplan.errors.BitplanError` family (each class
carries its status), request validation and HTTP errors, all as ``{"detail": str}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitplan.errors import BitplanError
from bitplan.service.schemas import Problem

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (400, 401, 404, 409, 413, 422, 429)}


def http_error(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    """An HTTP error for a route to raise."""
    return HTTPException(status_code=status, detail=detail, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(BitplanError)
    async def bad_input(_: Request, error: BitplanError) -> JSONResponse:
        return JSONResponse(status_code=error.status, content={"detail": str(error)})

    @app.exception_handler(RequestValidationError)
    async def readable_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts)})

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = dict(error.headers or {})
        if error.status_code == 405:  # list every method of the path, not only the first route's
            methods = {m for route in app.routes if isinstance(route, APIRoute)
                       and route.path_regex.match(request.url.path) for m in route.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(status_code=error.status_code, content={"detail": error.detail}, headers=headers)
