"""Job execution: Huey carries job ids; each attempt runs the pipeline in its own child process.

The worker thread that Huey gives a job claims it (a new attempt and fencing token), pulls the job's inputs from
the object store when it names any (``bitplan.service.storage``), starts a spawned child that runs the pipeline
into a staging folder, relays its progress to the store, heartbeats the lease, and turns a cancel request into the
child's ``should_stop``. Only a successful attempt that still holds the fence publishes its staging folder (renamed
into ``artifacts/``, or uploaded under its attempt's prefix) and records the result, so a cancelled, failed or
stale attempt publishes nothing. A crash of the child (bad model file, out of memory) fails the job, never the worker.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from huey import Huey, RedisHuey, SqliteHuey
from huey.consumer import Consumer

from bitplan.service.domain import LEASED, ArtifactRecord, JobError, JobResult, JobStatus, JobStore, StaleAttempt
from bitplan.service.model_cache import CacheTooSmall
from bitplan.service.objects import ChecksumMismatch, ObjectNotFound
from bitplan.service.stage_times import read_stage_times, stage_times_key, write_stage_times
from bitplan.service.storage import Storage, call_leased
from bitplan.stages import EtaModel, Stage, overall_fraction  # JobStore or RedisJobStore (the same methods)

logger = logging.getLogger(__name__)
T = TypeVar("T")

@dataclass(frozen=True)
class WorkerSettings:
    """Where state lives and how leases behave."""

    data_dir: Path  # with an object store: this worker's own scratch and model cache
    redis_url: str | None = None
    lease_s: float = 30.0
    heartbeat_s: float = 2.0
    max_attempts: int = 3
    cancel_grace_s: float = 20.0
    reap_every_s: float = 5.0
    store_url: str | None = None  # artifacts and inputs: the data folder (None), another folder, or s3://...
    model_cache_bytes: int = 20 * 2**30  # the bound of the local copies of models pulled from an object store
    store_wait_s: float = 300.0  # how long an attempt waits for an unreachable object store before giving up

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / "staging"

    @property
    def cache_dir(self) -> Path:
        """The sensitivity cache of a worker that shares its store with other hosts (kept in its own data folder;
        one machine's service keeps the default ``$BITPLAN_CACHE_DIR``, shared with ``bitplan run``)."""
        return self.data_dir / "cache"

    @property
    def stage_times_file(self) -> Path:
        """Each kind of job's measured stage durations on this machine (the ETA of the next one)."""
        return self.data_dir / "stage-times.json"


def make_huey(settings: WorkerSettings) -> Huey:
    """Huey on SQLite in the data folder (nothing to install), or on Redis when a URL is configured."""
    if settings.redis_url:
        return RedisHuey("bitplan", url=settings.redis_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("bitplan", filename=str(settings.data_dir / "queue.db"))


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), so that an attempt
    never outlives a SIGKILLed worker; exits at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def sweep_staging(store: JobStore, staging_dir: Path) -> list[str]:
    """Remove staging folders of attempts that no longer hold a lease (killed workers leave them); returns the
    names removed."""
    removed = []
    for folder in sorted(staging_dir.iterdir()) if staging_dir.is_dir() else []:
        job_id, _, attempt = folder.name.rpartition("-attempt")
        job = store.get(job_id) if job_id else None
        holds = (job is not None and job.status in LEASED and attempt.isdigit() and job.attempt == int(attempt)
                 and job.lease_until is not None and job.lease_until >= time.time())
        if not holds:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _child_main(request: dict[str, Any], staging: str, messages: Any, stop: Any, parent_pid: int,
                shared_cache: tuple[str, str] | None = None) -> None:
    """The pipeline in a fresh process; everything it reports goes through ``messages``. ``shared_cache``: the
    object store's URL and this worker's own cache folder, when the fleet shares its sensitivity cache."""
    die_with_parent(parent_pid)
    from bitplan.errors import BitplanError
    from bitplan.job.pipeline import run_budgets
    from bitplan.sensitivity import Cancelled
    from bitplan.spec import JobSpec
    from bitplan.stages import Stage

    def on_progress(stage: str, done: int, total: int) -> None:
        messages.put(("progress", str(Stage(stage).value), done, total))

    try:
        spec = JobSpec.from_dict(request)
        out_dirs = [Path(staging) / str(i) for i in range(spec.budgets)]
        cache_dir, mirror = None, None  # one machine: the default cache, shared with ``bitplan run``
        if shared_cache is not None:
            from bitplan.service.shared_cache import StoreCacheMirror

            cache_dir, mirror = Path(shared_cache[1]), StoreCacheMirror.from_url(shared_cache[0], Path(staging))
        results = run_budgets(spec, out_dirs=out_dirs, on_progress=on_progress, should_stop=stop.is_set,
                              cache_dir=cache_dir, cache_mirror=mirror)
        messages.put(("result", [r.to_json() for r in results]))
    except Cancelled:
        messages.put(("cancelled",))
    except BitplanError as error:
        messages.put(("error", JobError(code=type(error).__name__, message=str(error), retryable=False).to_dict()))
    except MemoryError:
        messages.put(("error", JobError(code="out_of_memory", message="the job ran out of memory",
                                        retryable=True).to_dict()))
    except Exception as error:  # noqa: BLE001 - reported to the caller, the worker lives on
        messages.put(("error", JobError(code="internal", message=f"{type(error).__name__}: {error}",
                                        retryable=True).to_dict()))


class JobRunner:
    """Runs one attempt of a job; Huey calls :meth:`__call__` with the job id."""

    def __init__(self, store: JobStore, settings: WorkerSettings, storage: Storage | None = None) -> None:
        self.store = store
        self.settings = settings
        self.storage = storage or Storage(settings.data_dir, settings.store_url,
                                          model_cache_bytes=settings.model_cache_bytes)
        self.shutting_down = threading.Event()  # set by WorkerPool.stop: give running attempts back
        self._active = 0
        self._active_lock = threading.Condition()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no attempt is running here (each gives its job back once ``shutting_down`` is set)."""
        with self._active_lock:
            return self._active_lock.wait_for(lambda: self._active == 0, timeout=timeout_s)

    def __call__(self, job_id: str) -> None:
        if self.shutting_down.is_set():
            return  # stopping: leave the job queued (the next worker to start enqueues every queued job)
        fence = self.store.claim(job_id, self.settings.lease_s)
        if fence is None:
            return  # finished, cancelled or claimed by another attempt: nothing to do
        job = self.store.get(job_id)
        assert job is not None
        with self._active_lock:
            self._active += 1
        try:
            with ExitStack() as held:  # the cached inputs, held against eviction while the attempt runs
                request = self._inputs(job_id, fence, job.request, held)
                if request is not None:
                    self._attempt(job_id, fence, request, stage_times_key(job.request))
        except StaleAttempt:
            logger.warning("job %s: attempt %d lost its lease; its work is discarded", job_id, fence)
        except Exception:  # noqa: BLE001 - a store is unreachable: stop; the lease expires and the job is requeued
            logger.exception("job %s: attempt %d cannot reach the job store or the object store; stopping it",
                             job_id, fence)
        finally:
            with self._active_lock:
                self._active -= 1
                self._active_lock.notify_all()

    def _leased(self, job_id: str, fence: int, work: Callable[[], T]) -> T:
        """``work()`` (a pull or a push) while the lease is kept, waiting out a restarting object store."""
        return call_leased(work, heartbeat=lambda: self.store.heartbeat(job_id, fence, self.settings.lease_s),
                           every_s=self.settings.heartbeat_s, store_wait_s=self.settings.store_wait_s,
                           stopping=self.shutting_down)

    def _inputs(self, job_id: str, fence: int, request: dict[str, Any], held: ExitStack) -> dict[str, Any] | None:
        """The request with its model and files pulled from the object store into the model cache (unchanged
        with local storage); ``None`` when they cannot be had (the job is failed, saying why)."""
        if not self.storage.names_objects(request):
            return request
        try:
            return self._leased(job_id, fence, lambda: self.storage.local_inputs(request, held))
        except (ObjectNotFound, FileNotFoundError, ChecksumMismatch, CacheTooSmall) as error:
            failure = JobError(code="input_unavailable", retryable=False,
                               message=f"the job's model or input files cannot be pulled from the object store: "
                                       f"{type(error).__name__}: {error}")
            self.store.finish(job_id, fence, JobStatus.FAILED, error=failure.to_dict())
            return None

    def _attempt(self, job_id: str, fence: int, request: dict[str, Any], times_key: str) -> None:
        """Run the pipeline in a child process into a staging folder, relay it, conclude the job."""
        staging = self.settings.staging_dir / f"{job_id}-attempt{fence}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        eta = EtaModel(time.monotonic(), read_stage_times(self.settings.stage_times_file, times_key))
        context = multiprocessing.get_context("spawn")
        messages = context.Queue()
        stop = context.Event()
        shared = (self.settings.store_url, str(self.settings.cache_dir)) if self.storage.remote else None
        child = context.Process(target=_child_main, args=(request, str(staging), messages, stop, os.getpid(), shared),
                                daemon=True)
        child.start()
        try:
            outcome = self._supervise(job_id, fence, child, messages, stop, eta)
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
            self._conclude(job_id, fence, outcome, child.exitcode, staging)
            if outcome is not None and outcome[0] == "result":
                write_stage_times(self.settings.stage_times_file, times_key, eta.durations())
        finally:
            if child.is_alive():
                child.kill()
            child.join(timeout=30)  # reaped: no zombie, no writes after the cleanup below
            shutil.rmtree(staging, ignore_errors=True)

    def _supervise(self, job_id: str, fence: int, child: Any, messages: Any, stop: Any,
                   eta: EtaModel) -> tuple[Any, ...] | None:
        """Relay the child's progress with its ETA (``eta``, fed every report), heartbeat the lease, turn a
        cancel request into ``stop``; the child's outcome message, or ``None`` when it died without one."""
        outcome: tuple[Any, ...] | None = None
        last_beat = time.monotonic()
        cancel_at: float | None = None
        fraction = 0.0
        loading = True  # the child reads its model in one call that cannot look at ``stop`` (it writes nothing)
        while outcome is None and (child.is_alive() or not messages.empty()):
            try:
                message = messages.get(timeout=0.2)
            except queue.Empty:
                message = None
            if message is not None and message[0] == "progress":
                now = time.monotonic()
                eta.observe(*message[1:], now=now)
                left = eta.remaining_s(now)
                elapsed = now - eta.start
                # the bar's fraction is the share of the job's expected time (never going back)
                share = overall_fraction(*message[1:]) if left is None else elapsed / max(elapsed + left, 1e-9)
                fraction = max(fraction, min(share, 0.99))
                loading = message[1] == Stage.LOAD.value and message[2] < message[3]
                detail = {"done": message[2], "total": message[3], "eta_s": None if left is None else round(left, 1)}
                self.store.progress(job_id, fence, message[1], fraction, detail,
                                    eta_at=None if left is None else time.time() + left)
            elif message is not None:
                outcome = message
            if time.monotonic() - last_beat >= self.settings.heartbeat_s:
                last_beat = time.monotonic()
                if self.store.heartbeat(job_id, fence, self.settings.lease_s) and not stop.is_set():
                    stop.set()
                    cancel_at = time.monotonic()
            if cancel_at is not None and (loading or time.monotonic() - cancel_at > self.settings.cancel_grace_s):
                # issue 45: a cancel during a long load stayed "cancelling" until the grace ran out; a child that
                # is still loading has nothing to finish or clean up, so it is stopped now
                child.kill()
                outcome = outcome or ("cancelled",)
            if outcome is None and self.shutting_down.is_set():
                child.kill()
                return ("released",)
        return outcome

    def _conclude(self, job_id: str, fence: int, outcome: tuple[Any, ...] | None, exitcode: int | None,
                  staging: Path) -> None:
        if outcome is None:
            crashed = JobError(code="worker_crashed", retryable=True,
                               message=f"the job's process ended with exit code {exitcode} before reporting a result")
            self.store.finish(job_id, fence, JobStatus.FAILED, error=crashed.to_dict())
        elif outcome[0] == "released":
            if self.store.release(job_id, fence, "worker shut down"):
                logger.info("job %s: attempt %d given back at shutdown; queued again", job_id, fence)
        elif outcome[0] == "cancelled":
            self.store.finish(job_id, fence, JobStatus.CANCELLED)
        elif outcome[0] == "error":
            self.store.finish(job_id, fence, JobStatus.FAILED, error=outcome[1])
        else:
            self.store.heartbeat(job_id, fence, self.settings.lease_s)  # still ours? (raises StaleAttempt if not)
            result = self._leased(job_id, fence, lambda: self._publish(job_id, fence, outcome[1], staging))
            self.store.finish(job_id, fence, JobStatus.SUCCEEDED, result=result.to_dict())
            for artifact in result.artifacts:  # what killed attempts left (whole objects, named by no job)
                try:
                    self.storage.discard_other_attempts(artifact.id, fence)
                except Exception:  # noqa: BLE001 - the retention sweep removes them later
                    logger.exception("job %s: could not remove earlier attempts' objects", job_id)

    def _publish(self, job_id: str, fence: int, runs: list[dict[str, Any]], staging: Path) -> JobResult:
        """Publish each run's staging folder under its artifact id (renamed into ``artifacts/``, or uploaded to
        the object store under this attempt's prefix)."""
        artifacts = []
        for index, run in enumerate(runs):
            artifact_id = f"{job_id}-{index}"
            self.storage.publish(artifact_id, fence, staging / str(index))
            artifacts.append(ArtifactRecord(id=artifact_id, bits_per_weight=run["bits_per_weight"], bytes=run["bytes"],
                                            manifest_sha256=run["manifest_sha256"]))
            run["artifact"] = artifact_id
        return JobResult(artifacts=artifacts, runs=runs)


class WorkerConsumer(Consumer):
    """Huey's consumer for ``bitplan worker``: on SIGTERM/SIGINT (Huey's handlers call ``stop``) the running
    attempts give their jobs back first (``before_stop``)."""

    before_stop: Any = None

    def stop(self, graceful: bool = False) -> None:
        if self.before_stop is not None:
            self.before_stop()
        super().stop(graceful=graceful)


class EmbeddedConsumer(Consumer):
    """Huey's consumer running in threads of the API process (no signal handlers: the server owns them)."""

    def _set_signal_handlers(self) -> None:
        pass


class WorkerPool:
    """A Huey consumer plus the lease reaper, started and stopped together."""

    def __init__(self, huey: Huey, store: JobStore, settings: WorkerSettings, *, workers: int = 1,
                 embedded: bool = True, runner: JobRunner | None = None) -> None:
        self.huey, self.store, self.settings, self.runner = huey, store, settings, runner
        consumer_class = EmbeddedConsumer if embedded else WorkerConsumer
        self.consumer = consumer_class(huey, workers=workers, worker_type="thread", periodic=False,
                                       initial_delay=0.05, max_delay=0.5)
        if not embedded:
            self.consumer.before_stop = self._give_back
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="bitplan-reaper", daemon=True)

    def start(self) -> None:
        for job_id in self.store.queued_ids():  # a queue message may have been lost: claiming is idempotent
            enqueue(self.huey, job_id)
        self._reaper.start()
        self.consumer.start()

    def run_forever(self) -> None:
        """For ``bitplan worker``: Huey's own consumer loop (with its signal handling) in this thread."""
        for job_id in self.store.queued_ids():
            enqueue(self.huey, job_id)
        self._reaper.start()
        self.consumer.run()

    def stop(self) -> None:
        """Stop taking jobs; each running attempt kills its child and gives its job back to the queue (so it
        does not stay "running" until its lease expires), then the consumer stops."""
        self._give_back()
        self.consumer.stop(graceful=False)

    def _give_back(self) -> None:
        self._stop.set()
        if self.runner is not None and not self.runner.shutting_down.is_set():
            self.runner.shutting_down.set()
            if not self.runner.wait_idle(timeout_s=20.0):
                logger.warning("a running attempt did not give its job back in 20 s; its lease will expire")

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.settings.reap_every_s):
            try:
                for job_id in self.store.reap(self.settings.max_attempts):
                    enqueue(self.huey, job_id)
                for name in sweep_staging(self.store, self.settings.staging_dir):
                    logger.info("removed the staging folder %s of an attempt that holds no lease", name)
            except Exception:  # noqa: BLE001 - keep reaping
                logger.exception("reaper pass failed")


_TASKS: dict[Huey, Any] = {}  # the job task registered on each Huey instance


def register_runner(huey: Huey, runner: JobRunner) -> None:
    """Register the job task (Huey calls ``runner(job_id)``) on this Huey instance."""

    def run_job(job_id: str) -> None:
        runner(job_id)

    _TASKS[huey] = huey.task(name="run_job")(run_job)


def enqueue(huey: Huey, job_id: str) -> None:
    """Put a job id on the queue (claiming is idempotent, so a duplicate message is harmless)."""
    _TASKS[huey](job_id)
