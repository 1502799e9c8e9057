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

from bitplan.hashing import sha256_file
from bitplan.service.async_client import AsyncClient
from bitplan.service.client_http import (
    DEFAULT_URL,
    IDEMPOTENT,
    RETRIED_STATUS,
    TERMINAL,
    Retrying,
    ServiceError,
    checked,
    connection_options,
    page_params,
    service_error,
    succeeded_or_raise,
    typed_answer,
)

__all__ = ["DEFAULT_URL", "IDEMPOTENT", "RETRIED_STATUS", "TERMINAL", "Artifacts", "AsyncClient", "Client", "Jobs",
           "LatencyTables", "Models", "ServiceError"]


class Client(Retrying):
    """``url`` defaults to ``$BITPLAN_URL`` (else the embedded service's address), ``api_key`` to
    ``$BITPLAN_API_KEY``. Idempotent calls (and a POST with an ``Idempotency-Key``) are retried with exponential
    backoff on connection errors and on 429/503 (honouring ``Retry-After``), at most ``retries`` times."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 4, backoff_s: float = 0.5) -> None:
        self.http = httpx.Client(**connection_options(url, api_key, timeout))
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
                return checked(response)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def pages(self, path: str, model: str, cursor: str | None = None, **query: Any) -> Iterator[Any]:
        """Every item of the list at ``path`` (as ``model``), following ``next_cursor`` while ``has_more``."""
        while True:
            page = self.request("GET", path, params=page_params(query, cursor)).json()
            yield from typed_answer(model, page["items"])
            if not page["has_more"]:
                return
            cursor = page["next_cursor"]

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Models:
    """Model references: the bundled ones, and those this key registered (paths under the service's roots)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, reference: str, *, name: str | None = None) -> Any:
        """Register a reference (a ``ModelPublic``); jobs then name it by its ``id`` (``mdl-...``)."""
        return typed_answer("ModelPublic", self.client.request("POST", "/v1/models",
                                                         json={"reference": reference, "name": name}).json())

    def list(self) -> list[Any]:
        """Every model this key can name (the bundled ones first; following the pages)."""
        return list(self.client.pages("/v1/models", "ModelPublic"))

    def get(self, model_id: str) -> Any:
        return typed_answer("ModelPublic", self.client.request("GET", f"/v1/models/{model_id}").json())


class Jobs:
    """Jobs: create, read, list, cancel, follow (events, SSE stream, wait), and more budgets of a finished one."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def frontier(self, job_id: str, *, kind: str = "auto", axis: str = "bytes") -> Any:
        """The succeeded job's predicted frontier, uniform baselines and measured artifacts (a ``FrontierPublic``;
        ``axis``: ``bytes``, or ``latency`` / ``prefill`` for a job that had a latency budget)."""
        return typed_answer("FrontierPublic", self.client.request("GET", f"/v1/jobs/{job_id}/frontier",
                                                            params={"kind": kind, "axis": axis}).json())

    def more_budgets(self, job_id: str, bits_per_weight: list[float]) -> dict[str, Any]:
        """A new job with ``job_id``'s spec and these budgets (its sensitivity pass comes from the cache)."""
        return typed_answer("JobPublic", self.client.request("POST", f"/v1/jobs/{job_id}/artifacts",
                                                       json={"bits_per_weight": bits_per_weight}).json())

    def create(self, *, model: str, idempotency_key: str | None = None, **options: Any) -> Any:
        """Submit a job (``bits_per_weight``, ``bytes`` or ``uniform_bits``, plus ``metric``, ``solver``, ...);
        the queued job as a ``JobPublic``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return typed_answer("JobPublic", self.client.request("POST", "/v1/jobs", json={"model": model, **options},
                                                       headers=headers).json())


    def get(self, job_id: str) -> Any:
        return typed_answer("JobPublic", self.client.request("GET", f"/v1/jobs/{job_id}").json())

    def list(self, *, status: str | None = None, limit: int = 50) -> list[Any]:
        """Every job of this key, oldest first (following the pages)."""
        return list(self.client.pages("/v1/jobs", "JobPublic", status=status, limit=limit))

    def delete(self, job_id: str) -> None:
        """Delete a finished job with its artifacts (a queued or running one: cancel it first)."""
        self.client.request("DELETE", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> Any:
        return typed_answer("JobPublic", self.client.request("POST", f"/v1/jobs/{job_id}/cancel").json())

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
                raise service_error(response)
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
                    return succeeded_or_raise(job)
                try:
                    for event in self.stream(job_id, after=last_seen):
                        last_seen = event["seq"]
                        if show(self.get(job_id)):
                            return succeeded_or_raise(self.get(job_id))
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
        return typed_answer("ArtifactPublic", self.client.request("GET", f"/v1/artifacts/{artifact_id}").json())

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
        return typed_answer("LatencyTablePublic", self.client.request("POST", "/v1/latency-tables",
                                                                json=json.loads(Path(path).read_text())).json())

    def list(self) -> list[Any]:
        return list(self.client.pages("/v1/latency-tables", "LatencyTablePublic"))
