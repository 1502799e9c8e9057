"""A worker's local copy of what it pulls from the object store (uploaded models above all), bounded in bytes.

An entry is one object (:meth:`ModelCache.fetch`) or every object under a prefix, a model's folder
(:meth:`ModelCache.fetch_tree`). Entries are downloaded into ``tmp/`` with each object's sha256 checked, then
renamed into ``entries/`` whole, so a half-downloaded model is never used. An index file records each entry's size
and a use counter; when a new entry needs room, the least recently used entries go first.

Locks are ``flock``\\ s on files under ``locks/``, so they hold between threads and between worker processes that
share the folder: fetching a missing entry takes its lock exclusively (a second fetch of the same key waits, then
finds it present: one download), :meth:`ModelCache.use` holds it shared while the caller reads the files (two jobs
on one model share it), and eviction skips an entry whose lock it cannot take at once (in use).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitplan.service.objects import ObjectInfo, ObjectStore, check_key

log = logging.getLogger(__name__)

INDEX_VERSION = 1


class CacheTooSmall(ValueError):
    """An entry is larger than the cache's whole byte bound."""


class ModelCache:
    """Objects of ``store`` pulled into ``root``, at most ``max_bytes`` in all (entries in use may exceed it)."""

    def __init__(self, store: ObjectStore, root: Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.store = store
        self.root = Path(root)
        self.max_bytes = max_bytes
        for folder in ("entries", "locks", "tmp"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def fetch(self, key: str, *, sha256: str | None = None) -> Path:
        """The local path of object ``key``, downloaded on a miss and checked against ``sha256`` (else the sha256
        the store recorded)."""
        with self.use(key, sha256=sha256) as path:
            return path

    def fetch_tree(self, prefix: str) -> Path:
        """The local folder holding every object under ``prefix`` (a model's folder), downloaded on a miss."""
        with self.use_tree(prefix) as path:
            return path

    @contextmanager
    def use(self, key: str, *, sha256: str | None = None) -> Iterator[Path]:
        """:meth:`fetch`, holding the entry against eviction until the block ends."""
        check_key(key)
        with self._entry(key, lambda: [ObjectInfo(key, self.store.size(key))], sha256) as folder:
            yield folder / key.rpartition("/")[2]

    @contextmanager
    def use_tree(self, prefix: str) -> Iterator[Path]:
        """:meth:`fetch_tree`, holding the entry against eviction until the block ends."""
        check_key(prefix.strip("/"))
        tree = prefix.strip("/") + "/"

        def listing() -> list[ObjectInfo]:
            found = [o for o in self.store.list(tree) if not o.key.endswith("/")]  # no folder markers
            if not found:
                raise FileNotFoundError(f"no objects under {tree!r} in the store")
            return found

        with self._entry(tree, listing, None) as folder:
            yield folder

    def entries(self) -> dict[str, dict[str, Any]]:
        """The index: entry name -> ``{"size", "seq"}`` (a higher ``seq`` was used more recently)."""
        with self._index_lock():
            return self._read_index()

    def total_bytes(self) -> int:
        return sum(int(e["size"]) for e in self.entries().values())

    # internals -------------------------------------------------------------------------------------------------

    @staticmethod
    def _slot(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()[:32]

    @contextmanager
    def _entry(self, name: str, listing: Callable[[], list[ObjectInfo]], sha256: str | None) -> Iterator[Path]:
        """Hold entry ``name`` (downloading it first when missing) and mark it used; yields its folder."""
        slot = self._slot(name)
        folder = self.root / "entries" / slot
        with (self.root / "locks" / f"{slot}.lock").open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # present: shared at once (jobs reading one model run side by side)
            if not self._present(name, folder):
                fcntl.flock(lock, fcntl.LOCK_EX)  # not atomic: whoever downloaded meanwhile is seen below
                if not self._present(name, folder):
                    self._download(name, folder, listing(), sha256)
            with self._index_lock():
                index = self._read_index()
                entry = index.get(name) or {"size": _folder_bytes(folder)}
                entry["seq"] = 1 + max((int(e["seq"]) for e in index.values()), default=0)
                entry["used"] = time.time()
                index[name] = entry
                self._write_index(index)
            fcntl.flock(lock, fcntl.LOCK_SH)  # others may read it now; eviction may not remove it
            yield folder

    def _present(self, name: str, folder: Path) -> bool:
        with self._index_lock():
            return name in self._read_index() and folder.is_dir()

    def _download(self, name: str, folder: Path, objects: list[ObjectInfo], sha256: str | None) -> None:
        needed = sum(o.size for o in objects)
        if needed > self.max_bytes:
            raise CacheTooSmall(f"{name!r} needs {needed} bytes, more than the cache's bound of {self.max_bytes}; "
                                "raise the bound")
        self._reserve(name, needed)
        staging = self.root / "tmp" / uuid.uuid4().hex
        base = name if name.endswith("/") else name.rpartition("/")[0] + "/" if "/" in name else ""
        try:
            for item in objects:
                self.store.get_file(item.key, staging / item.key[len(base):], sha256=sha256)
            shutil.rmtree(folder, ignore_errors=True)  # a leftover no index entry names
            os.replace(staging, folder)
        except BaseException:
            with self._index_lock():
                index = self._read_index()
                index.pop(name, None)
                self._write_index(index)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("cached %s (%d bytes)", name, needed)

    def _reserve(self, name: str, needed: int) -> None:
        """Evict least recently used entries until ``needed`` more bytes fit (entries in use are skipped), then
        record ``name`` with its size, so that downloads running side by side count each other's bytes."""
        with self._index_lock():
            index = self._read_index()
            index.pop(name, None)
            total = sum(int(e["size"]) for e in index.values())
            for other in sorted(index, key=lambda n: int(index[n]["seq"])):
                if total + needed <= self.max_bytes:
                    break
                if self._evict(other):
                    total -= int(index.pop(other)["size"])
            index[name] = {"size": needed, "seq": 0}
            self._write_index(index)
        if total + needed > self.max_bytes:
            log.warning("model cache over its bound of %d bytes: the entries in use hold %d", self.max_bytes, total)

    def _evict(self, name: str) -> bool:
        slot = self._slot(name)
        with (self.root / "locks" / f"{slot}.lock").open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(self.root / "entries" / slot, ignore_errors=True)
        log.info("evicted %s from the model cache", name)
        return True

    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        with (self.root / "locks" / "index.lock").open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read_index(self) -> dict[str, dict[str, Any]]:
        path = self.root / "index.json"
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        if data.get("version") != INDEX_VERSION:
            log.warning("model cache index of version %s ignored", data.get("version"))
            return {}
        entries: dict[str, dict[str, Any]] = data["entries"]
        return entries

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        path = self.root / "index.json"
        temp = path.with_name(f".index.json.{uuid.uuid4().hex[:8]}")
        temp.write_text(json.dumps({"version": INDEX_VERSION, "entries": index}, indent=1))
        os.replace(temp, path)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
