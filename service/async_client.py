"""The bitplan service from asyncio code (``httpx.AsyncClient``); re-exported by :mod:`bitplan.service.client`."""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx

from bitplan.service.client_http import (
    TERMINAL,
    Retrying,
    checked,
    connection_options,
    page_params,
    succeeded_or_raise,
    typed_answer,
)


class AsyncClient(Retrying):
    """The same service from asyncio code (``httpx.AsyncClient``), for the calls a notebook or an async platform
    makes: ``await client.create(...)``, ``get``, ``list``, ``cancel``, ``delete``, ``frontier``, ``wait`` (polls,
    honouring the job's ``eta_s``), ``artifact``. The same typed answers, retries and environment defaults as
    :class:`~bitplan.service.client.Client`; downloads stay with it (they are file work, not waiting)."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 4, backoff_s: float = 0.5, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http = httpx.AsyncClient(**connection_options(url, api_key, timeout), transport=transport)
        self.retries, self.backoff_s = retries, backoff_s

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import asyncio

        for attempt in itertools.count():
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                wait = self._retry_wait(method, kwargs, attempt)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            wait = self._retry_wait(method, kwargs, attempt, response)
            if wait is None:
                return checked(response)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def create(self, *, model: str, idempotency_key: str | None = None, **options: Any) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = await self.request("POST", "/v1/jobs", json={"model": model, **options}, headers=headers)
        return typed_answer("JobPublic", response.json())

    async def get(self, job_id: str) -> Any:
        return typed_answer("JobPublic", (await self.request("GET", f"/v1/jobs/{job_id}")).json())

    async def list(self, *, status: str | None = None, limit: int = 50) -> list[Any]:
        return await self.all_pages("/v1/jobs", "JobPublic", status=status, limit=limit)

    async def models(self) -> list[Any]:
        """Every model this key can name (the bundled ones first)."""
        return await self.all_pages("/v1/models", "ModelPublic")

    async def events(self, job_id: str, *, after: int = 0) -> list[Any]:
        return await self.all_pages(f"/v1/jobs/{job_id}/events", "EventPublic", cursor=str(after) if after else None,
                                    limit=1000)

    async def all_pages(self, path: str, model: str, cursor: str | None = None, **query: Any) -> list[Any]:
        """Every item of the list at ``path``, following ``next_cursor`` while ``has_more`` (as
        :meth:`~bitplan.service.client.Client.pages`)."""
        items: list[Any] = []
        while True:
            page = (await self.request("GET", path, params=page_params(query, cursor))).json()
            items += typed_answer(model, page["items"])
            if not page["has_more"]:
                return items
            cursor = page["next_cursor"]

    async def cancel(self, job_id: str) -> Any:
        return typed_answer("JobPublic", (await self.request("POST", f"/v1/jobs/{job_id}/cancel")).json())

    async def delete(self, job_id: str) -> None:
        await self.request("DELETE", f"/v1/jobs/{job_id}")

    async def frontier(self, job_id: str, *, kind: str = "auto", axis: str = "bytes") -> Any:
        response = await self.request("GET", f"/v1/jobs/{job_id}/frontier", params={"kind": kind, "axis": axis})
        return typed_answer("FrontierPublic", response.json())

    async def artifact(self, artifact_id: str) -> Any:
        return typed_answer("ArtifactPublic", (await self.request("GET", f"/v1/artifacts/{artifact_id}")).json())

    async def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None) -> Any:
        """Until the job ends: polls, sleeping ``poll_s`` or, when the service gives an ETA, up to a tenth of it
        (at most 10 s), so a long job is not polled every second. The succeeded job; a failed or cancelled one
        raises :class:`~bitplan.errors.JobFailed` / :class:`~bitplan.errors.JobCancelled`, as
        :meth:`~bitplan.service.client.Jobs.wait`."""
        import asyncio

        started = time.monotonic()
        while True:
            job = await self.get(job_id)
            if job.status in TERMINAL:
                return succeeded_or_raise(job)
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout_s} s")
            eta = job.progress.eta_s
            await asyncio.sleep(poll_s if not eta else min(max(poll_s, eta / 10), 10.0))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
