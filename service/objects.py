"""Where the service keeps its files: a local folder (the embedded default) or an S3-compatible object store
(:mod:`bitplan.service.objects_s3`).

Both implement :class:`ObjectStore`. Keys are ``/``-separated relative names (``artifacts/<id>/manifest.json``);
the local store maps them onto files under its root, exactly the layout of the one-machine service.

Guarantees, the same for both:

1. A written object appears only when complete: the local store writes a temporary file in the same folder and
   ``os.replace``\\ s it; the S3 store uploads (multipart above a threshold) and completes the upload only after the
   bytes read hashed to the sha256 computed beforehand; on any failure the multipart upload is aborted.
2. Every write records the object's sha256 (S3: the metadata ``x-amz-meta-sha256``, and the server checks each
   part's ``ChecksumSHA256``); every download is checked against it (or the sha256 the caller names, from a
   manifest) before it is renamed into place.
3. An unreachable store raises :class:`ObjectStoreUnavailable` (the API answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlparse

if TYPE_CHECKING:
    from bitplan.service.objects_s3 import S3Settings

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # one read or write of a stream
_TEMP_MARK = ".part-"  # temporary names: ``.<name>.part-<hex>``, never listed


class ObjectStoreUnavailable(Exception):
    """The object store cannot be reached (refused, timed out, 5xx): retry later."""


class ObjectNotFound(FileNotFoundError):
    """No object under this key."""


class ChecksumMismatch(Exception):
    """Bytes read or downloaded do not hash to the sha256 recorded for them (or that the caller expected)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, its size in bytes and, where known, its sha256 (hex)."""

    key: str
    size: int
    sha256: str | None = None


@runtime_checkable
class ObjectStore(Protocol):
    """Artifacts, uploaded models, caches and tables, by key. Writes are atomic, reads are checked."""

    def put_file(self, key: str, path: Path) -> ObjectInfo: ...
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...
    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> ObjectInfo: ...
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def info(self, key: str) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None: ...


def check_key(key: str) -> str:
    """``key`` unchanged if it is a relative ``/``-separated name without empty, ``.`` or ``..`` parts."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key {key!r} must be a relative name like 'artifacts/abc/manifest.json' "
                         "(no leading '/', no empty, '.' or '..' parts, no backslashes)")
    if any(p.startswith(".") and _TEMP_MARK in p for p in parts):
        raise ValueError(f"object key {key!r} has a part shaped like a temporary name ('.x{_TEMP_MARK}...')")
    return key


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temp_path_for(dest: Path) -> Path:
    """A fresh temporary name in ``dest``'s folder (so ``os.replace`` onto ``dest`` is atomic)."""
    return dest.with_name(f".{dest.name}{_TEMP_MARK}{uuid.uuid4().hex[:12]}")


def check_range(start: int, end: int | None, size: int) -> tuple[int, int]:
    """``[start, end)`` clamped to ``size``; ``ValueError`` when ``start`` is negative or past the last byte."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"range [{start}, {end}) must have 0 <= start <= end")
    if start >= size and not (start == 0 and size == 0):
        raise ValueError(f"range start {start} is past the end of an object of {size} bytes")
    return start, size if end is None else min(end, size)


class SourceReader:
    """A file opened for upload that hashes what is read, in order, and checks the total at the end.

    Reads may seek back (a retried single-part request): bytes already hashed are not hashed again. At end of file
    the digest must equal ``expected`` (computed by an earlier pass), else :class:`ChecksumMismatch`: the source
    changed between the two passes, and the upload must not complete."""

    def __init__(self, path: Path, expected: str | None = None) -> None:
        self._handle: IO[bytes] = path.open("rb")
        self._size = os.fstat(self._handle.fileno()).st_size
        self._digest = hashlib.sha256()
        self._hashed = 0
        self.expected = expected

    def read(self, size: int = -1) -> bytes:
        position = self._handle.tell()
        data = self._handle.read(size)
        if position > self._hashed:
            raise ChecksumMismatch("the source was read out of order; its sha256 cannot be checked")
        fresh = data[self._hashed - position:]
        if fresh:
            self._digest.update(fresh)
            self._hashed += len(fresh)
            if self._hashed >= self._size and self.expected not in (None, self._digest.hexdigest()):
                raise ChecksumMismatch(f"the source changed while it was read (sha256 {self.expected} expected)")
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def write_checked(chunks: Iterator[bytes], dest: Path, *, key: str, sha256: str | None) -> str:
    """Write ``chunks`` to a temporary file beside ``dest``, check its sha256 against ``sha256`` (when given), then
    rename it onto ``dest``; the sha256 (hex). Nothing is left at ``dest`` or beside it on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(dest)
    digest = hashlib.sha256()
    try:
        with temp.open("wb") as handle:
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ChecksumMismatch(f"{key}: downloaded bytes have sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(temp, dest)
    finally:
        temp.unlink(missing_ok=True)
    return digest.hexdigest()


class LocalObjectStore:
    """Objects as files under ``root`` (the one-machine layout, unchanged). Sha256s are computed, not stored."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        with SourceReader(Path(path)) as source:
            sha256 = write_checked(iter(lambda: source.read(CHUNK_BYTES), b""), self.path(key), key=key, sha256=None)
        return self.info(key, sha256=sha256)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        sha256 = write_checked(iter([data]), self.path(key), key=key, sha256=None)
        return ObjectInfo(key, len(data), sha256)

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> ObjectInfo:
        found = write_checked(self.open_range(key), Path(dest), key=key, sha256=sha256)
        return ObjectInfo(key, Path(dest).stat().st_size, found)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        start, end = check_range(start, end, self.size(key))
        handle = self.path(key).open("rb")  # opened now: a missing object fails here, not at the first chunk

        def chunks() -> Iterator[bytes]:
            with handle:
                handle.seek(start)
                left = end - start
                while left > 0 and (chunk := handle.read(min(CHUNK_BYTES, left))):
                    left -= len(chunk)
                    yield chunk

        return chunks()

    def info(self, key: str, *, sha256: str | None = None) -> ObjectInfo:
        path = self.path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return ObjectInfo(key, path.stat().st_size, sha256 or file_sha256(path))

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        path = self.path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        folder = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not folder.is_dir():
            return []
        found = []
        for path in folder.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not (path.name.startswith(".") and _TEMP_MARK in
                                                                   path.name):
                found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return None


def from_url(url: str, scratch: Path | None = None, *, settings: S3Settings | None = None) -> ObjectStore:
    """The store a URL names: ``s3://bucket/prefix`` an :class:`S3ObjectStore` (with
    ``settings`` for its timeouts and part sizes), ``file:///path`` or a plain path a :class:`LocalObjectStore`.
    ``scratch``: a local folder for the S3 store's temporary files (large ``put_bytes``); the system's by default."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from bitplan.service.objects_s3 import S3ObjectStore, S3Settings

        chosen = S3Settings(bucket=parsed.netloc) if settings is None else settings
        return S3ObjectStore(replace(chosen, bucket=parsed.netloc, prefix=parsed.path.strip("/")), scratch=scratch)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: a file URL names a local folder, 'file:///absolute/path'")
        return LocalObjectStore(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"object store URL {url!r} must be 's3://bucket/prefix', 'file:///path' or a folder")
    return LocalObjectStore(Path(url))


def __getattr__(name: str) -> Any:
    """``S3Settings`` and ``S3ObjectStore`` live in :mod:`bitplan.service.objects_s3`; re-exported lazily (that
    module imports this one)."""
    if name in ("S3Settings", "S3ObjectStore"):
        from bitplan.service import objects_s3

        return getattr(objects_s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
