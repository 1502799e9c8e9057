"""The ``bitplan`` command: the pipeline's commands (``bitplan.cli``) plus the service's: ``serve``, ``worker``,
``submit``, ``status``, ``wait``, ``download``."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitplan.cli import emit
from bitplan.cli import main as pipeline_main
from bitplan.errors import BitplanError, JobCancelled, JobFailed, ServiceUnreachable

DEFAULT_URL = "http://127.0.0.1:8321"


def default_data_dir() -> Path:
    return Path(os.environ.get("BITPLAN_DATA_DIR", Path.home() / ".local" / "share" / "bitplan"))


def _api_keys(path: str | None) -> dict[str, str]:
    """``owner:key`` lines (``#`` comments) -> ``{sha256(key): owner}``; keys are held hashed only."""
    from bitplan.service.app import hash_key

    if path is None:
        return {}
    keys = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        owner, _, key = line.partition(":")
        if not owner or not key:
            raise BitplanError(f"{path}:{number}: expected OWNER:KEY")
        keys[hash_key(key.strip())] = owner.strip()
    return keys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> None:
    from bitplan.service.app import ServiceSettings, create_app
    from bitplan.service.http_server import serve

    keys = _api_keys(args.api_keys)
    if not _is_loopback(args.host) and not keys:
        raise BitplanError(f"refusing to listen on {args.host} without API keys: pass --api-keys FILE (OWNER:KEY "
                           "lines), or bind to 127.0.0.1")
    settings = ServiceSettings(data_dir=Path(args.data_dir), model_roots=[Path(r) for r in args.model_root],
                               api_keys=keys, embedded_worker=not args.no_worker, workers=args.workers,
                               public_metrics=args.public_metrics, retention_days=args.retention_days,
                               redis_url=args.redis_url, store_url=args.store,
                               model_cache_bytes=args.model_cache_bytes, max_active_jobs=args.max_active_jobs)
    app = create_app(settings)
    prepare_store(app.state.storage)
    sys.stderr.write(f"bitplan service on http://{args.host}:{args.port} (data in {args.data_dir}, "
                     f"{'embedded worker' if not args.no_worker else 'no embedded worker'}, "
                     f"queue on {'Redis' if args.redis_url else 'SQLite'}, "
                     f"files in {args.store or 'the data folder'})\n")
    serve(app, host=args.host, port=args.port, header_timeout_s=args.header_timeout)


def prepare_store(storage: Any, *, abort_older_than_s: float | None = None) -> None:
    """With an S3 store: create its bucket when missing and, for a worker, abort the multipart uploads that
    crashed writers left (older than ``abort_older_than_s``). An unreachable store is only logged: it may be
    starting too, and requests answer 503 and attempts wait until it is back."""
    import logging

    from bitplan.service.objects import ObjectStoreUnavailable
    from bitplan.service.objects_s3 import S3ObjectStore

    objects = storage.objects
    if not isinstance(objects, S3ObjectStore):
        return
    try:
        objects.ensure_bucket()
        if abort_older_than_s is not None:
            objects.abort_incomplete_uploads(older_than_s=abort_older_than_s)
    except ObjectStoreUnavailable as error:
        logging.getLogger(__name__).warning("%s (going on: it is needed only when a job reads or writes)", error)


def _cmd_worker(args: argparse.Namespace) -> None:
    from bitplan.service.store import make_store
    from bitplan.service.worker import JobRunner, WorkerPool, WorkerSettings, make_huey, register_runner

    settings = WorkerSettings(data_dir=Path(args.data_dir), redis_url=args.redis_url, lease_s=args.lease,
                              heartbeat_s=args.heartbeat, store_url=args.store,
                              model_cache_bytes=args.model_cache_bytes)
    store = make_store(settings.data_dir, settings.redis_url)
    huey = make_huey(settings)
    runner = JobRunner(store, settings)
    prepare_store(runner.storage, abort_older_than_s=6 * 3600.0)
    register_runner(huey, runner)
    sys.stderr.write(f"bitplan worker: {args.workers} thread(s), data in {args.data_dir}, files in "
                     f"{args.store or 'the data folder'}\n")
    WorkerPool(huey, store, settings, workers=args.workers, embedded=False, runner=runner).run_forever()


def _client(args: argparse.Namespace) -> Any:
    from bitplan.service.client import Client

    return Client(args.url, api_key=args.api_key or os.environ.get("BITPLAN_API_KEY"))


def _service_call(function: Any) -> Any:
    """Turn the client's errors into the CLI's: a 4xx exits 3 (bad input) with the service's reason and code, an
    unreachable or unavailable service 4."""
    import httpx

    from bitplan.service.client import ServiceError

    def wrapped(args: argparse.Namespace) -> None:
        try:
            function(args)
        except ServiceError as error:
            if error.status == 503:
                raise ServiceUnreachable(f"the service at {args.url} is unavailable: {error.detail}") from None
            failure = BitplanError(str(error), param=error.param)
            failure.code = error.code or failure.code
            raise failure from None
        except httpx.HTTPError as error:
            raise ServiceUnreachable(f"cannot reach the service at {args.url}: {error}") from None

    return wrapped


def ensure_service(url: str, data_dir: Path, model_roots: Sequence[str] = (), timeout_s: float = 120.0
                   ) -> int | None:
    """Start ``bitplan serve`` in the background when nothing answers at the loopback ``url``; it keeps running
    (for later jobs and notebooks). Returns the new server's pid, or ``None`` when one was already up."""
    import subprocess
    import time
    from urllib.parse import urlparse

    import httpx

    def up() -> bool:
        try:
            return httpx.get(f"{url.rstrip('/')}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if up():
        return None
    parsed = urlparse(url)
    if not _is_loopback(parsed.hostname or ""):
        raise BitplanError(f"no service answers at {url}, and only a loopback service can be started here")
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "serve.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "bitplan.service.cli", "serve", "--host",
                                parsed.hostname or "127.0.0.1",
                                "--port", str(parsed.port or 80), "--data-dir", str(data_dir),
                                *[arg for root in model_roots for arg in ("--model-root", root)]],
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    (data_dir / "serve.pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout_s
    while not up():
        if process.poll() is not None or time.monotonic() > deadline:
            raise BitplanError(f"the embedded service did not start; see {data_dir / 'serve.log'}")
        time.sleep(0.3)
    sys.stderr.write(f"started the embedded service at {url} (pid {process.pid}, data in {data_dir}); it keeps "
                     f"running: stop it with 'kill {process.pid}'\n")
    return process.pid


def _cmd_submit(args: argparse.Namespace) -> None:
    from bitplan.cli_options import given_options

    options = given_options(args)
    options.pop("model")
    budgets = options.get("bits_per_weight")
    if budgets is not None:
        options["bits_per_weight"] = list(budgets) if len(budgets) > 1 else budgets[0]
    for name in ("candidate_bits",):
        if name in options:
            options[name] = list(options[name])
    if args.start_service:
        ensure_service(args.url, Path(args.data_dir), args.model_root)
    with _client(args) as client:
        table = options.get("latency_table")
        if table is not None and Path(table).is_file():  # a table file here: upload it, name it by its id
            options["latency_table"] = client.latency_tables.upload(table)["id"]
        job = client.jobs.create(model=args.model, idempotency_key=args.idempotency_key, **options)
        if args.wait or args.out:
            job = client.jobs.wait(job["id"], progress=not args.quiet)
        if args.out and job["status"] == "succeeded":
            runs = job["artifacts"]
            targets = [Path(args.out)] if len(runs) == 1 else [Path(args.out) / f"bpw-{a['bits_per_weight']:g}"
                                                               for a in runs]
            downloaded = [str(client.artifacts.download(a["id"], t, progress=not args.quiet))
                          for a, t in zip(runs, targets, strict=True)]
            job = {**job.to_dict(), "downloaded": downloaded}
    if job["status"] in ("failed", "cancelled"):
        kind = JobFailed if job["status"] == "failed" else JobCancelled
        error = kind(f"job {job['id']} {job['status']}: {(job.get('error') or {}).get('message', '')}")
        error.details = {"job": job if isinstance(job, dict) else job.to_dict()}
        raise error
    emit(job, args.json)


def _cmd_status(args: argparse.Namespace) -> None:
    with _client(args) as client:
        emit(client.jobs.get(args.job_id), args.json)


def _cmd_wait(args: argparse.Namespace) -> None:
    with _client(args) as client:
        emit(client.jobs.wait(args.job_id, progress=not args.quiet), args.json)


def _cmd_cancel(args: argparse.Namespace) -> None:
    with _client(args) as client:
        emit(client.jobs.cancel(args.job_id), args.json)


def _cmd_download(args: argparse.Namespace) -> None:
    with _client(args) as client:
        out = client.artifacts.download(args.artifact_id, args.out, progress=not args.quiet)
    emit({"artifact": args.artifact_id, "path": str(out)}, args.json)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=os.environ.get("BITPLAN_STORE") or None,
                        help="where artifacts and uploaded models live: a folder or file:///path (default: the data "
                             "folder), or s3://bucket/prefix (endpoint and keys from AWS_ENDPOINT_URL, "
                             "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; the bucket is created when missing). With "
                             "s3, --data-dir is only this process's scratch and model cache")
    parser.add_argument("--model-cache-bytes", type=_byte_count, default=20 * 2**30,
                        help="bound of the local cache of models pulled from an s3 store (default 20 GiB)")


def _byte_count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of bytes, got {text}")
    return value


def _job_count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of jobs, got {text}")
    return value


def add_service_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service with an embedded worker")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8321)
    serve.add_argument("--retention-days", type=float, default=None,
                       help="delete finished jobs (and their artifacts' disk space) unchanged for this many days "
                            "(default: keep everything)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a client has to send a request's headers before a 408 and a close (default 10)")
    serve.add_argument("--data-dir", default=str(default_data_dir()))
    serve.add_argument("--model-root", action="append", default=[],
                       help="folder whose model files clients may reference by path (repeatable)")
    serve.add_argument("--api-keys", help="file of OWNER:KEY lines; required to bind beyond loopback")
    serve.add_argument("--public-metrics", action="store_true", help="serve /metrics without a key (default: "
                                                                     "a key is needed when the service has keys)")
    serve.add_argument("--max-active-jobs", type=_job_count, default=4,
                       help="queued and running jobs one API key may have at once; more are refused with 429 "
                            "(default 4)")
    serve.add_argument("--workers", type=int, default=1, help="embedded worker threads (one job each)")
    serve.add_argument("--no-worker", action="store_true", help="API only; run 'bitplan worker' elsewhere")
    serve.add_argument("--redis-url", default=os.environ.get("BITPLAN_REDIS_URL"))
    _store_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    worker = sub.add_parser("worker", help="run jobs from the queue (beside 'bitplan serve --no-worker')")
    worker.add_argument("--data-dir", default=str(default_data_dir()))
    worker.add_argument("--redis-url", default=os.environ.get("BITPLAN_REDIS_URL"))
    worker.add_argument("--workers", type=int, default=1)
    worker.add_argument("--lease", type=float, default=30.0, help="seconds a job stays ours without a heartbeat")
    worker.add_argument("--heartbeat", type=float, default=2.0)
    _store_arguments(worker)
    worker.set_defaults(func=_cmd_worker)

    def client_command(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--url", default=os.environ.get("BITPLAN_URL", DEFAULT_URL))
        parser.add_argument("--api-key", help="API key (default: $BITPLAN_API_KEY)")
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
        parser.set_defaults(func=_service_call(func))
        return parser

    submit = client_command("submit", "submit a job to a running service", _cmd_submit)
    from bitplan.cli_options import add_spec_arguments

    add_spec_arguments(submit, http_only=True)  # every job option the API takes, with the spec's defaults
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end (progress on stderr)")
    submit.add_argument("--out", help="after success, download the artifact here (checksums verified); implies --wait")
    submit.add_argument("--start-service", action="store_true",
                        help="start 'bitplan serve' in the background first when nothing answers at --url")
    submit.add_argument("--data-dir", default=str(default_data_dir()), help="data folder of a started service")
    submit.add_argument("--model-root", action="append", default=[], help="model root of a started service")
    for name, help_text, func in (("status", "show a job", _cmd_status), ("wait", "wait for a job", _cmd_wait),
                                  ("cancel", "cancel a job", _cmd_cancel)):
        client_command(name, help_text, func).add_argument("job_id")
    download = client_command("download", "download an artifact, checking every file's sha256", _cmd_download)
    download.add_argument("artifact_id")
    download.add_argument("--out", required=True)


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, extend=add_service_commands)


if __name__ == "__main__":
    raise SystemExit(main())
