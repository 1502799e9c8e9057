"""Deleting jobs and artifacts, and the retention sweep that deletes old ones (``bitplan serve --retention-days``).

A job's record goes first, then its artifact folders: a crash between the two leaves folders that no job names,
which the next sweep removes (a folder is only ever removed when no job record names it, so an artifact being
published, whose job is still running, is never touched).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from bitplan.service.domain import Job, JobStore

log = logging.getLogger(__name__)


def artifact_folder(data_dir: Path, artifact_id: str) -> Path:
    return data_dir / "artifacts" / artifact_id


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def delete_job(store: JobStore, data_dir: Path, job_id: str) -> tuple[Job | None, int]:
    """Delete a finished job (``JobActive`` while it runs) and its artifact folders; the job and the bytes freed."""
    job = store.delete(job_id)
    if job is None:
        return None, 0
    freed = 0
    for artifact in job.outcome().artifacts:
        folder = artifact_folder(data_dir, artifact.id)
        if folder.is_dir():
            freed += folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
    return job, freed


def delete_artifact(store: JobStore, data_dir: Path, job_id: str, artifact_id: str) -> int:
    """Drop one artifact from its job's result, then its folder; the bytes freed."""
    store.drop_artifact(job_id, artifact_id)
    folder = artifact_folder(data_dir, artifact_id)
    freed = folder_bytes(folder) if folder.is_dir() else 0
    shutil.rmtree(folder, ignore_errors=True)
    return freed


def sweep(store: JobStore, data_dir: Path, keep_s: float, *, now: float | None = None) -> dict[str, int]:
    """Delete finished jobs unchanged for ``keep_s`` seconds with their artifacts, and artifact folders no job
    names; ``{"jobs", "orphans", "bytes"}`` removed."""
    now = time.time() if now is None else now
    jobs = freed = orphans = 0
    for job_id in store.finished_before(now - keep_s):
        try:
            job, size = delete_job(store, data_dir, job_id)
        except Exception:  # noqa: BLE001  (a job changed meanwhile: the next sweep sees it again)
            log.exception("retention: could not delete job %s", job_id)
            continue
        jobs += job is not None
        freed += size
    root = data_dir / "artifacts"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        job_id = folder.name.rpartition("-")[0]
        if folder.is_dir() and job_id and store.get(job_id) is None:
            freed += folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            orphans += 1
    return {"jobs": jobs, "orphans": orphans, "bytes": freed}


class RetentionSweeper:
    """A thread that runs :func:`sweep` every ``every_s`` seconds until stopped."""

    def __init__(self, store: JobStore, data_dir: Path, keep_s: float, every_s: float) -> None:
        self.store, self.data_dir, self.keep_s, self.every_s = store, data_dir, keep_s, every_s
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
                removed = sweep(self.store, self.data_dir, self.keep_s)
                if removed["jobs"] or removed["orphans"]:
                    log.info("retention: removed %(jobs)d jobs, %(orphans)d orphan folders, %(bytes)d bytes",
                             removed)
            except Exception:  # noqa: BLE001  (the store is down: try again next time)
                log.exception("retention sweep failed")
            self._stop.wait(self.every_s)
