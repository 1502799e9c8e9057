"""The HTTP plumbing :class:`~bitplan.service.client.Client` and :class:`~bitplan.service.async_client.AsyncClient`
share: connection defaults from the environment, the retry rule, the mapping of a 4xx/5xx answer to
:class:`ServiceError` and of an ended job to its typed error, the service's response models, and list paging."""

from __future__ import annotations

import os
from typing import Any

import httpx

from bitplan.errors import JobCancelled, JobFailed, JobNotSucceeded

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8321"
RETRIED_STATUS = (429, 503)
IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")


class ServiceError(Exception):
    """A 4xx/5xx answer, with the service's reason and its problem ``code`` and ``param`` when given."""

    def __init__(self, status: int, detail: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.code, self.param = status, detail, code, param


class Retrying:
    """The retry rule of both clients: at most ``retries`` more attempts, backoff from ``backoff_s``."""

    retries: int
    backoff_s: float

    def _retry_wait(self, method: str, kwargs: dict[str, Any], attempt: int,
                    response: httpx.Response | None = None) -> float | None:
        """Seconds to wait before trying again, or ``None``: not retried (a call that is not idempotent, the last
        attempt, or an answer other than 429/503). Backoff doubles; a ``Retry-After`` wins."""
        retriable = method.upper() in IDEMPOTENT or "Idempotency-Key" in (kwargs.get("headers") or {})
        if not retriable or attempt >= self.retries:
            return None
        if response is None:
            return self.backoff_s * 2**attempt
        if response.status_code not in RETRIED_STATUS:
            return None
        return _retry_after(response, self.backoff_s * 2**attempt)


def succeeded_or_raise(job: Any) -> Any:
    """``job`` (an ended ``JobPublic``) when it succeeded; else raises its :class:`JobNotSucceeded`."""
    if job.status == "succeeded":
        return job
    kind: type[JobNotSucceeded] = JobFailed if job.status == "failed" else JobCancelled
    reason = job.error.message if job.error else ""
    error = kind(f"job {job.id} {job.status}" + (f": {reason}" if reason else ""), job_id=job.id,
                 job_status=str(job.status), error_message=reason)
    error.details = {"job": job.to_dict()}  # the command line's --json error line carries the job
    raise error


def typed_answer(model: str, data: Any) -> Any:
    """``data`` (a JSON object, or a list of them) as the service's response model ``model``."""
    from bitplan.service import schemas

    cls = getattr(schemas, model)
    return [cls.model_validate(item) for item in data] if isinstance(data, list) else cls.model_validate(data)


def connection_options(url: str | None, api_key: str | None, timeout: float) -> dict[str, Any]:
    """The httpx client's base URL, headers and timeout: ``$BITPLAN_URL`` and ``$BITPLAN_API_KEY`` by default."""
    url = url or os.environ.get("BITPLAN_URL", DEFAULT_URL)
    api_key = api_key or os.environ.get("BITPLAN_API_KEY")
    return {"base_url": url.rstrip("/"), "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
            "timeout": timeout}


def checked(response: httpx.Response) -> httpx.Response:
    """``response``, unless it is a 4xx/5xx answer: then its :class:`ServiceError`."""
    if response.status_code >= 400:
        raise service_error(response)
    return response


def page_params(query: dict[str, Any], cursor: str | None) -> dict[str, Any]:
    """The query of one page of a list: ``query`` (its filters and ``limit``), and the cursor when there is one."""
    return {**{k: v for k, v in query.items() if v is not None}, **({"cursor": cursor} if cursor else {})}


def _retry_after(response: httpx.Response, fallback: float) -> float:
    value = response.headers.get("Retry-After", "")
    return min(float(value), 60.0) if value.replace(".", "", 1).isdigit() else fallback


def service_error(response: httpx.Response) -> ServiceError:
    """The :class:`ServiceError` of a 4xx/5xx answer, with the problem's ``detail``, ``code`` and ``param``."""
    try:
        body = response.json()
    except ValueError:
        return ServiceError(response.status_code, response.text)
    if not isinstance(body, dict):
        return ServiceError(response.status_code, response.text)
    return ServiceError(response.status_code, str(body.get("detail", response.text)), code=body.get("code"),
                        param=body.get("param"))

