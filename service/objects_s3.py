"""The S3-compatible object store (boto3, the extra ``s3``): one bucket, an optional prefix, multipart uploads
checked part by part with ``ChecksumSHA256`` and completed only when the bytes read hash to the sha256 computed
beforehand. Split from :mod:`bitplan.service.objects` (the interface and the local store), which re-exports
:class:`S3Settings` and :class:`S3ObjectStore`; boto3 is imported only when a store is made."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bitplan.service.objects import (
    CHUNK_BYTES,
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreUnavailable,
    SourceReader,
    check_key,
    file_sha256,
    write_checked,
)

log = logging.getLogger(__name__)

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
