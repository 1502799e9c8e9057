"""Python client for the bitplan service (httpx): ``client.jobs.create / get / retrieve / list / cancel / events /
stream / wait`` (``wait`` is woken by the job's server-sent events) and
``client.artifacts.download`` with checksum verification.

    from bitplan.service.client import Client
    client = Client("http://127.0.0.1:8321")
    job = client.jobs.create(model="smollm2-135m", bits_per_weight=3.5)
    job = client.jobs.wait(job.id)                  # progress bar on stderr; a failed job raises JobFailed
    client.artifacts.download(job.artifacts[0].id, "out/")

Answers are the service's own response models (``bitplan.service.schemas``: ``JobPublic``, ``ArtifactPublic``,
``ModelPublic``, ``FrontierPublic``, ``LatencyTablePublic``, ``EventPublic``), typed, and readable as mappings too
(``job["status"]``); ``.to_dict()`` gives the JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bitplan.errors import JobCancelled, JobFailed, JobNotSucceeded
from bitplan.hashing import sha256_file

TERMINAL = ("succeeded", "failed", "cancelled")


def _succeeded(job: Any) -> Any:
    """``job`` (an ended ``JobPublic``) when it succeeded; else raises its :class:`JobNotSucceeded`."""
    if job.status == "succeeded":
        return job
    kind: type[JobNotSucceeded] = JobFailed if job.status == "failed" else JobCancelled
    reason = job.error.message if job.error else ""
    error = kind(f"job {job.id} {job.status}" + (f": {reason}" if reason else ""), job_id=job.id,
                 job_status=str(job.status), error_message=reason)
    error.details = {"job": job.to_dict()}  # the command line's --json error line carries the job
    raise error


def _typed(model: str, data: Any) -> Any:
    """``data`` (a JSON object, or a list of them) as the service's response model ``model``."""
    from bitplan.service import schemas

    cls = getattr(schemas, model)
    return [cls.model_validate(item) for item in data] if isinstance(data, list) else cls.model_validate(data)


DEFAULT_URL = "http://127.0.0.1:8321"
RETRIED_STATUS = (429, 503)
IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")


class ServiceError(Exception):
    """A 4xx/5xx answer, with the service's reason and its problem ``code`` and ``param`` when given."""

    def __init__(self, status: int, detail: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.code, self.param = status, detail, code, param


class Client:
    """``url`` defaults to ``$BITPLAN_URL`` (else the embedded service's address), ``api_key`` to
    ``$BITPLAN_API_KEY``. Idempotent calls (and a POST with an ``Idempotency-Key``) are retried with exponential
    backoff on connection errors and on 429/503 (honouring ``Retry-After``), at most ``retries`` times."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 4, backoff_s: float = 0.5) -> None:
        self.http = httpx.Client(**_connection(url, api_key, timeout))
        self.retries, self.backoff_s = retries, backoff_s
        self.jobs = Jobs(self)
        self.artifacts = Artifacts(self)
        self.latency_tables = LatencyTables(self)
        self.models = Models(self)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                wait = self._retry_wait(method, kwargs, attempt)
                if wait is None:
                    raise
                time.sleep(wait)
                continue
            wait = self._retry_wait(method, kwargs, attempt, response)
            if wait is None:
                return _checked(response)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def pages(self, path: str, model: str, cursor: str | None = None, **query: Any) -> Iterator[Any]:
        """Every item of the list at ``path`` (as ``model``), following ``next_cursor`` while ``has_more``."""
        while True:
            page = self.request("GET", path, params=_page_params(query, cursor)).json()
            yield from _typed(model, page["items"])
            if not page["has_more"]:
                return
            cursor = page["next_cursor"]

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

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _connection(url: str | None, api_key: str | None, timeout: float) -> dict[str, Any]:
    """The httpx client's base URL, headers and timeout: ``$BITPLAN_URL`` and ``$BITPLAN_API_KEY`` by default."""
    url = url or os.environ.get("BITPLAN_URL", DEFAULT_URL)
    api_key = api_key or os.environ.get("BITPLAN_API_KEY")
    return {"base_url": url.rstrip("/"), "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
            "timeout": timeout}


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise _service_error(response)
    return response


def _page_params(query: dict[str, Any], cursor: str | None) -> dict[str, Any]:
    """The query of one page of a list: ``query`` (its filters and ``limit``), and the cursor when there is one."""
    return {**{k: v for k, v in query.items() if v is not None}, **({"cursor": cursor} if cursor else {})}


def _retry_after(response: httpx.Response, fallback: float) -> float:
    value = response.headers.get("Retry-After", "")
    return min(float(value), 60.0) if value.replace(".", "", 1).isdigit() else fallback


def _service_error(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()
    except ValueError:
        return ServiceError(response.status_code, response.text)
    if not isinstance(body, dict):
        return ServiceError(response.status_code, response.text)
    return ServiceError(response.status_code, str(body.get("detail", response.text)), code=body.get("code"),
                        param=body.get("param"))


class Models:
    """Model references: the bundled ones, and those this key registered (paths under the service's roots)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, reference: str, *, name: str | None = None) -> Any:
        """Register a reference (a ``ModelPublic``); jobs then name it by its ``id`` (``mdl-...``)."""
        return _typed("ModelPublic", self.client.request("POST", "/v1/models",
                                                         json={"reference": reference, "name": name}).json())

    def list(self) -> list[Any]:
        """Every model this key can name (the bundled ones first; following the pages)."""
        return list(self.client.pages("/v1/models", "ModelPublic"))

    def get(self, model_id: str) -> Any:
        return _typed("ModelPublic", self.client.request("GET", f"/v1/models/{model_id}").json())


class Jobs:
    """Jobs: create, read, list, cancel, follow (events, SSE stream, wait), and more budgets of a finished one."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def frontier(self, job_id: str, *, kind: str = "auto", axis: str = "bytes") -> Any:
        """The succeeded job's predicted frontier, uniform baselines and measured artifacts (a ``FrontierPublic``;
        ``axis``: ``bytes``, or ``latency`` / ``prefill`` for a job that had a latency budget)."""
        return _typed("FrontierPublic", self.client.request("GET", f"/v1/jobs/{job_id}/frontier",
                                                            params={"kind": kind, "axis": axis}).json())

    def more_budgets(self, job_id: str, bits_per_weight: list[float]) -> dict[str, Any]:
        """A new job with ``job_id``'s spec and these budgets (its sensitivity pass comes from the cache)."""
        return _typed("JobPublic", self.client.request("POST", f"/v1/jobs/{job_id}/artifacts",
                                                       json={"bits_per_weight": bits_per_weight}).json())

    def create(self, *, model: str, idempotency_key: str | None = None, **options: Any) -> Any:
        """Submit a job (``bits_per_weight``, ``bytes`` or ``uniform_bits``, plus ``metric``, ``solver``, ...);
        the queued job as a ``JobPublic``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return _typed("JobPublic", self.client.request("POST", "/v1/jobs", json={"model": model, **options},
                                                       headers=headers).json())


    def get(self, job_id: str) -> Any:
        return _typed("JobPublic", self.client.request("GET", f"/v1/jobs/{job_id}").json())

    def list(self, *, status: str | None = None, limit: int = 50) -> list[Any]:
        """Every job of this key, oldest first (following the pages)."""
        return list(self.client.pages("/v1/jobs", "JobPublic", status=status, limit=limit))

    def delete(self, job_id: str) -> None:
        """Delete a finished job with its artifacts (a queued or running one: cancel it first)."""
        self.client.request("DELETE", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> Any:
        return _typed("JobPublic", self.client.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def events(self, job_id: str, *, after: int = 0) -> list[Any]:
        """The job's events after sequence number ``after`` (every page)."""
        return list(self.client.pages(f"/v1/jobs/{job_id}/events", "EventPublic", cursor=str(after) if after else None,
                                      limit=1000))

    def retrieve(self, job_id: str) -> Any:
        """The job as it is now (an alias of :meth:`get`, the name other clients use)."""
        return self.get(job_id)

    def stream(self, job_id: str, *, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events as the server sends them (``/events/stream``, server-sent events), from ``after``;
        ends when the job has ended and every event was sent. Each is ``{"seq", "kind", "data"}``."""
        headers = {"Last-Event-ID": str(after), "Accept": "text/event-stream"}
        # a plain tuple, not an ``httpx.Timeout``: the HTTP client may be another httpx-like one (starlette's test
        # client is built on httpx2, whose Timeout refuses httpx's)
        own = self.client.http.timeout
        with self.client.http.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=headers,
                                     timeout=(own.connect, 60.0, own.write, own.pool)) as response:
            if response.status_code >= 400:
                response.read()
                raise _service_error(response)
            event: dict[str, Any] = {}
            for line in response.iter_lines():
                if not line:
                    if "seq" in event:
                        yield event
                    event = {}
                elif line.startswith("id:"):
                    event["seq"] = int(line[3:].strip())
                elif line.startswith("event:"):
                    event["kind"] = line[6:].strip()
                elif line.startswith("data:"):
                    event["data"] = json.loads(line[5:].strip() or "null")

    def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None,
             progress: bool = True) -> Any:
        """Wait until the job ends, woken by its event stream (server-sent events); when the stream breaks, by
        polling every ``poll_s`` until it can be reopened. A progress bar (stage, fraction, ETA) on stderr.
        The succeeded job; a failed one raises :class:`~bitplan.errors.JobFailed`, a cancelled one
        :class:`~bitplan.errors.JobCancelled` (both :class:`~bitplan.errors.JobNotSucceeded`: ``job_id``,
        ``job_status``, ``error_message``; the job itself in ``details["job"]``)."""
        from tqdm.auto import tqdm  # a widget in a notebook, a line on a terminal

        started = time.monotonic()
        bar = tqdm(total=100, file=sys.stderr, disable=not progress, desc="queued",
                   bar_format="{desc:<24} {percentage:3.0f}%|{bar}| {elapsed} elapsed {postfix}")

        def show(job: Any) -> bool:
            bar.n = round(100 * job["progress"]["fraction"])
            bar.set_description(job["progress"]["stage"] or job["status"], refresh=False)
            eta = job["progress"].get("eta_s")
            bar.postfix = "" if eta is None else f"ETA {eta:.0f} s"
            bar.refresh()
            if timeout_s is not None and time.monotonic() - started > timeout_s and job["status"] not in TERMINAL:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            return job["status"] in TERMINAL

        last_seen = 0
        try:
            while True:
                job = self.get(job_id)
                if show(job):
                    return _succeeded(job)
                try:
                    for event in self.stream(job_id, after=last_seen):
                        last_seen = event["seq"]
                        if show(self.get(job_id)):
                            return _succeeded(self.get(job_id))
                except (httpx.TransportError, ServiceError) as error:
                    if isinstance(error, ServiceError) and error.status not in RETRIED_STATUS:
                        raise
                    time.sleep(poll_s)
        finally:
            bar.close()


class Artifacts:
    def __init__(self, client: Client) -> None:
        self.client = client

    def delete(self, artifact_id: str) -> None:
        """Delete one artifact's files (its job stays)."""
        self.client.request("DELETE", f"/v1/artifacts/{artifact_id}")

    def get(self, artifact_id: str) -> Any:
        return _typed("ArtifactPublic", self.client.request("GET", f"/v1/artifacts/{artifact_id}").json())

    def download(self, artifact_id: str, out_dir: str | Path, *, progress: bool = False) -> Path:
        """Every file of the artifact into ``out_dir``, each checked against its sha256 and then renamed into
        place (a failed download leaves no file under the final name). An interrupted download resumes from its
        ``.part`` file with a byte range; a byte bar on stderr with ``progress``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for entry in self.get(artifact_id)["files"]:
            target = out / entry["name"]
            if target.is_file() and sha256_file(target) == entry["sha256"]:
                continue  # already here, verified
            partial = target.with_name(target.name + ".part")
            self._fetch(f"/v1/artifacts/{artifact_id}/files/{entry['name']}", partial, entry["bytes"], progress)
            if sha256_file(partial) != entry["sha256"]:
                partial.unlink()
                raise ServiceError(502, f"{entry['name']} failed its sha256 check; download it again")
            partial.replace(target)
        return out

    def _fetch(self, path: str, partial: Path, size: int, progress: bool) -> None:
        """Fetch ``path`` into ``partial``, continuing a shorter one with ``Range: bytes=N-``."""
        from tqdm.auto import tqdm

        offset = partial.stat().st_size if partial.is_file() else 0
        if offset >= size:
            offset = 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.client.http.stream("GET", path, headers=headers) as response:
            if response.status_code >= 400:
                raise ServiceError(response.status_code, response.read().decode(errors="replace"))
            resumed = response.status_code == 206
            with partial.open("ab" if resumed else "wb") as stream, tqdm(
                    total=size, initial=offset if resumed else 0, unit="B", unit_scale=True, file=sys.stderr,
                    disable=not progress, desc=partial.name.removesuffix(".part")) as bar:
                for chunk in response.iter_bytes():
                    stream.write(chunk)
                    bar.update(len(chunk))


class LatencyTables:
    """Latency tables measured on the machine that will run a model (``bitplan latency --out FILE``)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def upload(self, path: str | os.PathLike[str]) -> Any:
        """Upload a table file; a job names the returned ``id`` in ``latency_table``."""
        return _typed("LatencyTablePublic", self.client.request("POST", "/v1/latency-tables",
                                                                json=json.loads(Path(path).read_text())).json())

    def list(self) -> list[Any]:
        return list(self.client.pages("/v1/latency-tables", "LatencyTablePublic"))


class AsyncClient:
    """The same service from asyncio code (``httpx.AsyncClient``), for the calls a notebook or an async platform
    makes: ``await client.create(...)``, ``get``, ``list``, ``cancel``, ``delete``, ``frontier``, ``wait`` (polls,
    honouring the job's ``eta_s``), ``artifact``. The same typed answers, retries and environment defaults as
    :class:`Client`; downloads stay with :class:`Client` (they are file work, not waiting)."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 4, backoff_s: float = 0.5, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.http = httpx.AsyncClient(**_connection(url, api_key, timeout), transport=transport)
        self.retries, self.backoff_s = retries, backoff_s

    _retry_wait = Client._retry_wait  # the same retry rule as the blocking client

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
                return _checked(response)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def create(self, *, model: str, idempotency_key: str | None = None, **options: Any) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = await self.request("POST", "/v1/jobs", json={"model": model, **options}, headers=headers)
        return _typed("JobPublic", response.json())

    async def get(self, job_id: str) -> Any:
        return _typed("JobPublic", (await self.request("GET", f"/v1/jobs/{job_id}")).json())

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
        :meth:`Client.pages`)."""
        items: list[Any] = []
        while True:
            page = (await self.request("GET", path, params=_page_params(query, cursor))).json()
            items += _typed(model, page["items"])
            if not page["has_more"]:
                return items
            cursor = page["next_cursor"]

    async def cancel(self, job_id: str) -> Any:
        return _typed("JobPublic", (await self.request("POST", f"/v1/jobs/{job_id}/cancel")).json())

    async def delete(self, job_id: str) -> None:
        await self.request("DELETE", f"/v1/jobs/{job_id}")

    async def frontier(self, job_id: str, *, kind: str = "auto", axis: str = "bytes") -> Any:
        response = await self.request("GET", f"/v1/jobs/{job_id}/frontier", params={"kind": kind, "axis": axis})
        return _typed("FrontierPublic", response.json())

    async def artifact(self, artifact_id: str) -> Any:
        return _typed("ArtifactPublic", (await self.request("GET", f"/v1/artifacts/{artifact_id}")).json())

    async def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None) -> Any:
        """Until the job ends: polls, sleeping ``poll_s`` or, when the service gives an ETA, up to a tenth of it
        (at most 10 s), so a long job is not polled every second. The succeeded job; a failed or cancelled one
        raises :class:`~bitplan.errors.JobFailed` / :class:`~bitplan.errors.JobCancelled`, as :meth:`Jobs.wait`."""
        import asyncio

        started = time.monotonic()
        while True:
            job = await self.get(job_id)
            if job.status in TERMINAL:
                return _succeeded(job)
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
