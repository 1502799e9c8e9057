"""Deleting jobs and artifacts, and the retention sweep that deletes old ones (``bitplan serve --retention-days``).

A job's record goes first, then its artifacts' files (folders in the data folder, or objects in the object store):
a crash between the two leaves files that no job names, which the next sweep removes (files are only ever removed
when no job record names them, so an artifact being published, whose job is still running, is never touched).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from bitplan.service.domain import Job, JobStore
from bitplan.service.storage import Storage

log = logging.getLogger(__name__)


def artifact_folder(data_dir: Path, artifact_id: str) -> Path:
    return data_dir / "artifacts" / artifact_id


def _storage(files: Storage | Path) -> Storage:
    """A data folder stands for the local storage in it (the one-machine layout)."""
    return files if isinstance(files, Storage) else Storage(Path(files))


def delete_job(store: JobStore, files: Storage | Path, job_id: str) -> tuple[Job | None, int]:
    """Delete a finished job (``JobActive`` while it runs) and its artifacts' files; the job and the bytes freed."""
    job = store.delete(job_id)
    if job is None:
        return None, 0
    storage = _storage(files)
    return job, sum(storage.delete_artifact(artifact.id) for artifact in job.outcome().artifacts)


def delete_artifact(store: JobStore, files: Storage | Path, job_id: str, artifact_id: str) -> int:
    """Drop one artifact from its job's result, then its files; the bytes freed."""
    store.drop_artifact(job_id, artifact_id)
    return _storage(files).delete_artifact(artifact_id)


def sweep(store: JobStore, files: Storage | Path, keep_s: float, *, now: float | None = None) -> dict[str, int]:
    """Delete finished jobs unchanged for ``keep_s`` seconds with their artifacts, and artifacts no job names;
    ``{"jobs", "orphans", "bytes"}`` removed."""
    storage = _storage(files)
    now = time.time() if now is None else now
    jobs = freed = orphans = 0
    for job_id in store.finished_before(now - keep_s):
        try:
            job, size = delete_job(store, storage, job_id)
        except Exception:  # noqa: BLE001  (a job changed meanwhile: the next sweep sees it again)
            log.exception("retention: could not delete job %s", job_id)
            continue
        jobs += job is not None
        freed += size
    for artifact_id in storage.artifact_ids():
        job_id = artifact_id.rpartition("-")[0]
        if job_id and store.get(job_id) is None:
            freed += storage.delete_artifact(artifact_id)
            orphans += 1
    return {"jobs": jobs, "orphans": orphans, "bytes": freed}


class RetentionSweeper:
    """A thread that runs :func:`sweep` every ``every_s`` seconds until stopped."""

    def __init__(self, store: JobStore, files: Storage | Path, keep_s: float, every_s: float) -> None:
        self.store, self.storage, self.keep_s, self.every_s = store, _storage(files), keep_s, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bitplan-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                removed = sweep(self.store, self.storage, self.keep_s)
                if removed["jobs"] or removed["orphans"]:
                    log.info("retention: removed %(jobs)d jobs, %(orphans)d orphan artifacts, %(bytes)d bytes",
                             removed)
            except Exception:  # noqa: BLE001  (the store is down: try again next time)
                log.exception("retention sweep failed")
            self._stop.wait(self.every_s)
