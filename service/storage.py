"""Where a service's artifacts and job inputs live: its data folder (one machine, the default) or an object store
that the API and workers on other machines share (``--store s3://bucket/prefix``, issue 44).

With an object store, nothing but Redis and the store is shared, and ``--data-dir`` is each process's own scratch:

- the API pushes a job's input files (a model under a model root, an uploaded latency table, an evaluation text)
  to the store when the job is created, under keys named by their content (``models/<digest>/...``,
  ``inputs/<digest>/...``), and the job's request names them ``objects:<key>``;
- a worker pulls them into its :class:`~bitplan.service.model_cache.ModelCache` (bounded, LRU), runs the job in
  its scratch folder and pushes each artifact's files under ``artifacts/<id>/attempt-<n>/``, the manifest last.
  The job is marked succeeded only afterwards, and a job's ``attempt`` names the attempt that published it, so an
  attempt that lost its lease never mixes its files into the published ones;
- the API reads manifests and streams files from the store.

With the data folder (or a local ``--store`` folder) everything stays as it was: ``artifacts/<id>/`` folders
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bitplan.service.model_cache import ModelCache
from bitplan.service.objects import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    file_sha256,
    from_url,
)
from bitplan.sources.models import BUNDLED_MODELS, PICKLE_SUFFIXES, resolve_reference
from bitplan.targets.manifest import MANIFEST, Manifest, read_manifest

log = logging.getLogger(__name__)
T = TypeVar("T")

REMOTE = "objects:"  # a request value naming an object-store key instead of a path
INPUT_FIELDS = (("budget", "latency_table"), ("refinement", "eval_text"))  # single files a job may name
SIDECAR_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # config and tokenizer files beside a weights file


@dataclass(frozen=True)
class ArtifactListing:
    """A published artifact as the API describes it: its manifest, and every file's sha256 and size (the
    manifest's own included)."""

    manifest: Manifest
    digests: dict[str, str]
    sizes: dict[str, int]


class Storage:
    """Artifacts and inputs in ``root`` (a folder: the data folder unless ``url`` names another) or in the object
    store ``url`` names; ``data_dir`` is then local scratch and the model cache (``model_cache_bytes``)."""

    def __init__(self, data_dir: Path, url: str | None = None, *, model_cache_bytes: int = 20 * 2**30) -> None:
        self.data_dir = Path(data_dir)
        store = from_url(url, scratch=self._scratch() if url.startswith("s3:") else None) if url else None
        self.objects: ObjectStore | None = None if store is None or isinstance(store, LocalObjectStore) else store
        self.root = store.root if isinstance(store, LocalObjectStore) else self.data_dir
        self.model_cache_bytes = model_cache_bytes
        self._digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash once

    @property
    def remote(self) -> bool:
        return self.objects is not None

    def _scratch(self) -> Path:
        folder = self.data_dir / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _store(self) -> ObjectStore:
        if self.objects is None:
            raise RuntimeError("this service keeps its files in a folder, not an object store")
        return self.objects

    # -- artifacts ----------------------------------------------------------------------------------------------
    def folder(self, artifact_id: str) -> Path:
        """A published artifact's folder (local storage)."""
        return self.root / "artifacts" / artifact_id

    @staticmethod
    def prefix(artifact_id: str, attempt: int) -> str:
        """The object-store prefix of an artifact published by attempt ``attempt`` of its job."""
        return f"artifacts/{artifact_id}/attempt-{attempt}/"

    def listing(self, artifact_id: str, attempt: int) -> ArtifactListing:
        """The manifest, digests and sizes of a published artifact (``ObjectNotFound`` when it has none)."""
        if self.objects is None:
            folder = self.folder(artifact_id)
            manifest = read_manifest(folder, verify=False)
            digests = {**manifest.files, MANIFEST: file_sha256(folder / MANIFEST)}
            return ArtifactListing(manifest, digests, {n: (folder / n).stat().st_size for n in digests})
        prefix = self.prefix(artifact_id, attempt)
        raw = self.read(artifact_id, attempt, MANIFEST)
        if raw is None:
            raise ObjectNotFound(prefix + MANIFEST)
        manifest = Manifest.from_dict(json.loads(raw))
        digests = {**manifest.files, MANIFEST: hashlib.sha256(raw).hexdigest()}
        sizes = {o.key[len(prefix):]: o.size for o in self.objects.list(prefix)}
        return ArtifactListing(manifest, digests, {n: sizes.get(n, 0) for n in digests})

    def read(self, artifact_id: str, attempt: int, name: str) -> bytes | None:
        """One small file of a published artifact (a manifest, the allocation problem); ``None`` when absent."""
        if self.objects is None:
            path = self.folder(artifact_id) / name
            return path.read_bytes() if path.is_file() else None
        key = self.prefix(artifact_id, attempt) + name
        try:
            return b"".join(self.objects.open_range(key))
        except (ObjectNotFound, ValueError):  # ValueError: an empty object's range
            return b"" if self.objects.exists(key) else None

    def publish(self, artifact_id: str, attempt: int, source: Path) -> None:
        """Make ``source`` (one run's finished folder) the artifact's files: renamed into place locally; uploaded
        file by file to the store, the manifest last, so a manifest names only complete objects."""
        if self.objects is None:
            target = self.folder(artifact_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(source, target)
            except OSError:  # another file system (a --store folder elsewhere): copied, then renamed
                shutil.move(str(source), str(target))
            return
        files = sorted(p for p in source.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == MANIFEST):
            self.objects.put_file(self.prefix(artifact_id, attempt) + path.relative_to(source).as_posix(), path)

    def discard_other_attempts(self, artifact_id: str, attempt: int) -> int:
        """Delete what earlier (killed or stale) attempts uploaded for this artifact; how many objects."""
        if self.objects is None:
            return 0
        keep = self.prefix(artifact_id, attempt)
        stale = [o.key for o in self.objects.list(f"artifacts/{artifact_id}/") if not o.key.startswith(keep)]
        for key in stale:
            self.objects.delete(key)
        return len(stale)

    def delete_artifact(self, artifact_id: str) -> int:
        """Remove every file of an artifact (all attempts); the bytes freed."""
        if self.objects is None:
            folder = self.folder(artifact_id)
            freed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) \
                if folder.is_dir() else 0
            shutil.rmtree(folder, ignore_errors=True)
            return freed
        found = self.objects.list(f"artifacts/{artifact_id}/")
        for item in found:
            self.objects.delete(item.key)
        return sum(o.size for o in found)

    def artifact_ids(self) -> list[str]:
        """Every artifact id with files stored (the retention sweep's orphan candidates)."""
        if self.objects is None:
            root = self.root / "artifacts"
            return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        return sorted({o.key.split("/")[1] for o in self.objects.list("artifacts/") if o.key.count("/") >= 2})

    # -- job inputs ---------------------------------------------------------------------------------------------
    def push_inputs(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request with its model and input files in the object store, named ``objects:<key>`` (unchanged
        with local storage, and for bundled models, which every worker has installed)."""
        if self.objects is None:
            return request
        pushed = {**request, "model": self.push_model(request["model"])}
        for part, name in INPUT_FIELDS:
            value = (request.get(part) or {}).get(name)
            if isinstance(value, str) and not value.startswith(REMOTE):
                path = Path(value)
                pushed[part] = {**request[part], name: self._push_files("inputs", path.parent, [path], path.name)}
        return pushed

    def push_model(self, reference: str) -> str:
        """A checked model reference (a bundled id or a resolved path) as a worker elsewhere can read it."""
        if reference in BUNDLED_MODELS or reference.startswith(REMOTE) or self.objects is None:
            return reference
        kind, path = resolve_reference(reference)
        if kind == "hf-folder":
            files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() not in PICKLE_SUFFIXES]
            return self._push_files("models", path, files, "")
        siblings = [] if kind == "gguf" else [p for p in sorted(path.parent.iterdir())
                                              if p.is_file() and p.suffix.lower() in SIDECAR_SUFFIXES]
        return self._push_files("models", path.parent, [path, *siblings], path.name)

    def _push_files(self, kind: str, base: Path, files: list[Path], entry: str) -> str:
        """Upload ``files`` (relative to ``base``) under ``<kind>/<digest of names and contents>/`` unless they
        are there already; ``objects:<kind>/<digest>[/<entry>]``."""
        store = self._store()
        digests = {p.relative_to(base).as_posix(): self._sha256(p) for p in files}
        digest = hashlib.sha256("".join(f"{n}\0{d}\n" for n, d in sorted(digests.items())).encode()).hexdigest()
        tree = f"{kind}/{digest[:40]}"
        for name, sha256 in sorted(digests.items()):
            try:
                present = store.info(f"{tree}/{name}").sha256 == sha256
            except ObjectNotFound:
                present = False
            if not present:
                store.put_file(f"{tree}/{name}", base / name)
        log.info("job input %s in the store as %s", base / entry if entry else base, tree)
        return f"{REMOTE}{tree}/{entry}" if entry else f"{REMOTE}{tree}"

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        mark = (str(path), stat.st_size, stat.st_mtime_ns)
        if mark not in self._digests:
            self._digests[mark] = file_sha256(path)
        return self._digests[mark]

    @staticmethod
    def names_objects(request: dict[str, Any]) -> bool:
        """Whether the request names anything in an object store."""
        values = [request.get("model"), *((request.get(part) or {}).get(name) for part, name in INPUT_FIELDS)]
        return any(isinstance(v, str) and v.startswith(REMOTE) for v in values)

    def local_inputs(self, request: dict[str, Any], stack: ExitStack) -> dict[str, Any]:
        """The request with every ``objects:`` reference pulled into the model cache and replaced by its local
        path; each entry is held against eviction until ``stack`` closes (the caller's, closed on failure too)."""
        resolved = {**request, "model": self._pull(stack, request["model"])}
        for part, name in INPUT_FIELDS:
            value = (request.get(part) or {}).get(name)
            if isinstance(value, str):
                resolved[part] = {**request[part], name: self._pull(stack, value)}
        return resolved

    def _pull(self, stack: ExitStack, value: str) -> str:
        if not value.startswith(REMOTE):
            return value
        if self.objects is None:
            raise FileNotFoundError(f"{value!r} is in the service's object store and this worker has none: start it "
                                    "with the API's --store URL")
        key = value[len(REMOTE):]
        parts = key.split("/")
        cache = ModelCache(self._store(), self.data_dir / "model-cache", self.model_cache_bytes)
        folder = stack.enter_context(cache.use_tree("/".join(parts[:2])))
        return str(folder.joinpath(*parts[2:])) if len(parts) > 2 else str(folder)


def call_leased(work: Callable[[], T], *, heartbeat: Callable[[], object], every_s: float, store_wait_s: float,
                stopping: threading.Event) -> T:
    """``work()`` in a thread while ``heartbeat`` keeps the job's lease (a model pull or an upload can outlast
    it); while the object store is unreachable, tried again every few seconds for up to ``store_wait_s`` (the
    store may be restarting) before its :class:`ObjectStoreUnavailable` is raised. ``heartbeat`` raising
    (``StaleAttempt``) ends the wait: the attempt is no longer ours."""
    deadline = time.monotonic() + store_wait_s
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitplan-store")
    try:
        while True:
            future = pool.submit(work)
            while True:
                try:
                    return future.result(timeout=every_s)
                except FutureTimeout:
                    heartbeat()
                except ObjectStoreUnavailable as error:
                    if time.monotonic() > deadline or stopping.is_set():
                        raise
                    log.warning("%s; trying again in %.0f s", error, every_s)
                    break
            pause = time.monotonic() + min(5.0, max(every_s, 0.5))
            while time.monotonic() < pause:
                heartbeat()
                time.sleep(min(every_s, 1.0))
    finally:
        pool.shutdown(wait=False)  # a stale attempt does not wait for its upload to end
