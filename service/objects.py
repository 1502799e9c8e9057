"""Where the service keeps its files: a local folder (the embedded default) or an S3-compatible object store.

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

import base64
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlparse

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


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach an S3-compatible store. The endpoint and credentials come from boto3's standard
    variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) unless named here."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    multipart_threshold: int = 64 << 20  # bytes; S3 parts are at least 5 MiB, so smaller chunks are raised
    multipart_chunksize: int = 16 << 20
    max_concurrency: int = 4
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3  # botocore's standard retry mode: total attempts per request
    checksums: bool = True  # send ChecksumSHA256 with each part (servers that reject it: set False)
    addressing_style: Literal["path", "virtual", "auto"] = "path"  # "path" suits S3-compatible servers

    def __post_init__(self) -> None:
        if not _BUCKET.match(self.bucket):
            raise ValueError(f"bucket {self.bucket!r} must be 3-63 characters of a-z, 0-9, '.' and '-', starting "
                             "and ending with a letter or digit")
        if self.prefix.strip("/"):
            check_key(self.prefix.strip("/"))
        if self.multipart_threshold < 1 or self.multipart_chunksize < 1 or self.max_concurrency < 1:
            raise ValueError("multipart_threshold, multipart_chunksize and max_concurrency must be at least 1")
        if self.addressing_style not in ("path", "virtual", "auto"):
            raise ValueError(f"addressing_style {self.addressing_style!r} must be 'path', 'virtual' or 'auto'")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0 or self.max_attempts < 1:
            raise ValueError("timeouts must be positive and max_attempts at least 1")


class S3ObjectStore:
    """Objects in one bucket of an S3-compatible store, under an optional prefix, through boto3 (the extra
    ``s3``). The bucket is created on the first write when missing."""

    def __init__(self, settings: S3Settings, *, scratch: Path | None = None) -> None:
        import boto3
        import botocore.exceptions
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.settings = settings
        self.scratch = scratch
        self._errors = botocore.exceptions
        options: dict[str, Any] = {}
        if not settings.checksums and "request_checksum_calculation" in Config.OPTION_DEFAULTS:
            # botocore >= 1.36 sends CRC32 checksums by default, which older S3-compatible servers reject
            options = {"request_checksum_calculation": "when_required",
                       "response_checksum_validation": "when_required"}
        config = Config(connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
                        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                        signature_version="s3v4", s3={"addressing_style": settings.addressing_style},
                        max_pool_connections=max(10, 2 * settings.max_concurrency), **options)
        self.client: Any = boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url,
                                                          region_name=settings.region, config=config)
        self.transfer = TransferConfig(multipart_threshold=settings.multipart_threshold,
                                       multipart_chunksize=settings.multipart_chunksize,
                                       max_concurrency=settings.max_concurrency, use_threads=True)
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    def _name(self, key: str) -> str:
        prefix = self.settings.prefix.strip("/")
        return f"{prefix}/{check_key(key)}" if prefix else check_key(key)

    @contextmanager
    def _translate(self, key: str = "") -> Iterator[None]:
        """botocore's errors as ours: unreachable or 5xx -> unavailable, 404 -> not found, 416 -> ValueError."""
        errors = self._errors
        try:
            yield
        except (errors.ConnectionError, errors.HTTPClientError) as error:
            raise ObjectStoreUnavailable(f"the object store {self.client.meta.endpoint_url} cannot be reached "
                                         f"({type(error).__name__}); retry shortly") from error
        except errors.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                raise ObjectNotFound(key) from error
            if status == 416 or code == "InvalidRange":
                raise ValueError(f"{key}: the range asked for is outside the object") from error
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                raise ObjectStoreUnavailable(f"the object store answered {status} {code}; retry shortly") from error
            raise

    def ensure_bucket(self) -> None:
        """Create the bucket when it is missing (once per store object)."""
        with self._bucket_lock, self._translate():
            if self._bucket_ready:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except self._errors.ClientError as error:
                if int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) != 404:
                    raise
                region = self.client.meta.region_name
                where = {} if region in (None, "us-east-1", "aws-global") else {
                    "CreateBucketConfiguration": {"LocationConstraint": region}}
                try:
                    self.client.create_bucket(Bucket=self.bucket, **where)
                    log.info("created bucket %s", self.bucket)
                except self._errors.ClientError as race:
                    if race.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                        raise
            self._bucket_ready = True

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        path = Path(path)
        if path.stat().st_size < self.settings.multipart_threshold:
            with SourceReader(path) as source:
                return self.put_bytes(key, source.read())
        sha256 = file_sha256(path)  # first pass: the metadata must be named before the upload starts
        extra: dict[str, Any] = {"Metadata": {"sha256": sha256}}
        if self.settings.checksums:
            extra["ChecksumAlgorithm"] = "SHA256"
        self.ensure_bucket()
        with self._translate(key), SourceReader(path, expected=sha256) as source:
            # s3transfer aborts the multipart upload when a part or the read fails; the reader fails at the end
            # of the file when the bytes read do not hash to ``sha256``, before the upload is completed
            self.client.upload_fileobj(source, self.bucket, self._name(key), ExtraArgs=extra, Config=self.transfer)
        stored = self.info(key)
        if stored.size != path.stat().st_size or stored.sha256 != sha256:
            self.delete(key)
            raise ChecksumMismatch(f"{key}: the store holds {stored.size} bytes with sha256 {stored.sha256}")
        return stored

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        if len(data) >= self.settings.multipart_threshold:
            with tempfile.TemporaryDirectory(dir=self.scratch) as folder:
                spooled = Path(folder) / "data"
                spooled.write_bytes(data)
                return self.put_file(key, spooled)
        digest = hashlib.sha256(data)
        extra: dict[str, Any] = {"Metadata": {"sha256": digest.hexdigest()}}
        if self.settings.checksums:
            extra["ChecksumSHA256"] = base64.b64encode(digest.digest()).decode()
        self.ensure_bucket()
        with self._translate(key):
            self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data, **extra)
        return ObjectInfo(key, len(data), digest.hexdigest())

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> ObjectInfo:
        with self._translate(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
            expected = sha256 or response.get("Metadata", {}).get("sha256")
            body = response["Body"]
            try:
                found = write_checked(body.iter_chunks(CHUNK_BYTES), Path(dest), key=key, sha256=expected)
            finally:
                body.close()
        if expected is None:
            log.warning("%s has no sha256 recorded; downloaded unchecked", key)
        return ObjectInfo(key, Path(dest).stat().st_size, found)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"range [{start}, {end}) must have 0 <= start <= end")
        if end == start:
            return iter(())
        span = {} if (start, end) == (0, None) else {"Range": f"bytes={start}-" if end is None else
                                                     f"bytes={start}-{end - 1}"}
        with self._translate(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key), **span)["Body"]

        def chunks() -> Iterator[bytes]:
            with self._translate(key):
                try:
                    yield from body.iter_chunks(CHUNK_BYTES)
                finally:
                    body.close()

        return chunks()

    def info(self, key: str) -> ObjectInfo:
        with self._translate(key):
            head = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        return ObjectInfo(key, int(head["ContentLength"]), head.get("Metadata", {}).get("sha256"))

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return self.info(key).size

    def delete(self, key: str) -> None:
        with self._translate(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.settings.prefix.strip("/")
        strip = len(base) + 1 if base else 0
        found = []
        try:
            with self._translate(prefix):
                for page in self.client.get_paginator("list_objects_v2").paginate(
                        Bucket=self.bucket, Prefix=f"{base}/{prefix}" if base else prefix):
                    found += [ObjectInfo(item["Key"][strip:], int(item["Size"])) for item in page.get("Contents", [])]
        except ObjectNotFound:  # no bucket yet: nothing stored
            return []
        return sorted(found, key=lambda o: o.key)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        with self._translate(key):
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=expires_s)
        return url

    def abort_incomplete_uploads(self, older_than_s: float = 0.0) -> int:
        """Abort the multipart uploads under this store's prefix begun more than ``older_than_s`` ago (a crashed
        writer's leftovers, invisible but billed); how many were aborted."""
        cutoff = time.time() - older_than_s
        base = self.settings.prefix.strip("/")
        aborted = 0
        with self._translate():
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=f"{base}/" if base else ""):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() <= cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted += 1
        return aborted


def from_url(url: str, scratch: Path | None = None, *, settings: S3Settings | None = None) -> ObjectStore:
    """The store a URL names: ``s3://bucket/prefix`` an :class:`S3ObjectStore` (with
    ``settings`` for its timeouts and part sizes), ``file:///path`` or a plain path a :class:`LocalObjectStore`.
    ``scratch``: a local folder for the S3 store's temporary files (large ``put_bytes``); the system's by default."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        chosen = S3Settings(bucket=parsed.netloc) if settings is None else settings
        return S3ObjectStore(replace(chosen, bucket=parsed.netloc, prefix=parsed.path.strip("/")), scratch=scratch)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: a file URL names a local folder, 'file:///absolute/path'")
        return LocalObjectStore(Path(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"object store URL {url!r} must be 's3://bucket/prefix', 'file:///path' or a folder")
    return LocalObjectStore(Path(url))
