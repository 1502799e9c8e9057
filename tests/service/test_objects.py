"""The object stores (a local folder, and S3 through a real SeaweedFS ``weed server -s3`` started here) behave the
same, and the model cache on top of them keeps to its bound (issue 44)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from bitplan.service import objects, objects_s3
from bitplan.service.model_cache import CacheTooSmall, ModelCache
from bitplan.service.objects import (
    ChecksumMismatch,
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreUnavailable,
    S3ObjectStore,
    S3Settings,
    from_url,
)
from tests.service.weed import s3_environment

MiB = 1 << 20


@pytest.fixture
def s3_env(weed: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The standard variables point boto3 at the test server (no profile or config file of the machine's)."""
    for name, value in s3_environment(weed, tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    return weed


SMALL_PARTS = S3Settings(bucket="bitplan-tests", multipart_threshold=MiB, multipart_chunksize=5 * MiB,
                         connect_timeout_s=2, read_timeout_s=10, max_attempts=2)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Each behavioural test runs against both stores; the S3 one under a fresh prefix of a shared bucket."""
    if request.param == "local":
        return from_url((tmp_path / "objects").as_uri())
    request.getfixturevalue("s3_env")
    return from_url(f"s3://bitplan-tests/run-{uuid.uuid4().hex[:8]}", tmp_path, settings=SMALL_PARTS)


def _write(path: Path, size: int, seed: int = 0) -> bytes:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    path.write_bytes(data[:size])
    return data[:size]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".part-" in p.name)


def _incomplete_uploads(store: ObjectStore) -> list[dict[str, Any]]:
    if not isinstance(store, S3ObjectStore):
        return []
    uploads: list[dict[str, Any]] = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return uploads


def test_round_trip_checks_sha256(store: ObjectStore, tmp_path: Path) -> None:
    data = _write(tmp_path / "manifest.json", 10_000)
    sha256 = hashlib.sha256(data).hexdigest()
    assert store.put_file("artifacts/a1/manifest.json", tmp_path / "manifest.json").sha256 == sha256
    info = store.info("artifacts/a1/manifest.json")
    assert (info.size, info.sha256) == (10_000, sha256)
    got = store.get_file("artifacts/a1/manifest.json", tmp_path / "out" / "manifest.json", sha256=sha256)
    assert got.sha256 == sha256 and (tmp_path / "out" / "manifest.json").read_bytes() == data
    assert _leftovers(tmp_path) == []


def test_multipart_upload_round_trips(store: ObjectStore, tmp_path: Path) -> None:
    data = _write(tmp_path / "model.safetensors", 6 * MiB + 123, seed=1)
    sha256 = hashlib.sha256(data).hexdigest()
    assert store.put_file("models/m/model.safetensors", tmp_path / "model.safetensors").sha256 == sha256
    if isinstance(store, S3ObjectStore):  # two parts (5 MiB + the rest), each checked by the server
        head = store.client.head_object(Bucket=store.bucket, Key=store._name("models/m/model.safetensors"),
                                        ChecksumMode="ENABLED")
        assert head["ETag"].endswith('-2"') and head["Metadata"]["sha256"] == sha256
        assert head["ChecksumSHA256"].endswith("-2")
    store.get_file("models/m/model.safetensors", tmp_path / "back", sha256=sha256)
    assert (tmp_path / "back").read_bytes() == data
    assert _incomplete_uploads(store) == []


def test_range_reads(store: ObjectStore) -> None:
    data = bytes(range(256)) * 40
    store.put_bytes("tables/latency.json", data)
    assert b"".join(store.open_range("tables/latency.json", 0, 10)) == data[:10]
    assert b"".join(store.open_range("tables/latency.json", 100, 2000)) == data[100:2000]
    assert b"".join(store.open_range("tables/latency.json", len(data) - 5)) == data[-5:]
    assert b"".join(store.open_range("tables/latency.json", 10, len(data) + 100)) == data[10:]
    assert b"".join(store.open_range("tables/latency.json", 7, 7)) == b""
    store.put_bytes("tables/empty.json", b"")
    assert b"".join(store.open_range("tables/empty.json")) == b"" and store.size("tables/empty.json") == 0
    with pytest.raises(ValueError, match="range"):
        b"".join(store.open_range("tables/latency.json", len(data) + 1))
    with pytest.raises(ObjectNotFound):
        store.open_range("tables/missing.json", 0, 10)


def test_exists_size_list_delete(store: ObjectStore) -> None:
    for key in ("artifacts/a/1", "artifacts/a/2", "artifacts/ab/1", "cache/x"):
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("artifacts/a/")] == ["artifacts/a/1", "artifacts/a/2"]
    assert [o.key for o in store.list("artifacts/a")] == ["artifacts/a/1", "artifacts/a/2", "artifacts/ab/1"]
    assert [o.size for o in store.list("cache/")] == [7]
    assert store.exists("cache/x") and store.size("cache/x") == 7
    store.delete("cache/x")
    store.delete("cache/x")  # idempotent
    assert not store.exists("cache/x") and store.list("cache/") == []
    with pytest.raises(ObjectNotFound):
        store.size("cache/x")


def test_download_with_wrong_sha256_leaves_nothing(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("artifacts/b/weights.bin", b"weights" * 100)
    with pytest.raises(ChecksumMismatch, match="expected"):
        store.get_file("artifacts/b/weights.bin", tmp_path / "dl" / "weights.bin", sha256="0" * 64)
    assert not (tmp_path / "dl" / "weights.bin").exists() and _leftovers(tmp_path) == []


def test_failed_upload_leaves_no_object_and_no_upload(store: ObjectStore, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A source that fails mid-read (after the first part) publishes nothing, half or whole."""
    _write(tmp_path / "big.bin", 6 * MiB, seed=2)
    read = objects.SourceReader.read
    calls = []

    def failing(self: objects.SourceReader, size: int = -1) -> bytes:
        calls.append(size)
        if len(calls) > 1:
            raise OSError("disk read error")
        return read(self, size)

    monkeypatch.setattr(objects.SourceReader, "read", failing)
    with pytest.raises(OSError, match="disk read error"):
        store.put_file("models/half/model.safetensors", tmp_path / "big.bin")
    assert not store.exists("models/half/model.safetensors") and store.list("models/") == []
    assert _incomplete_uploads(store) == []
    if isinstance(store, LocalObjectStore):
        assert _leftovers(store.root) == []


def test_source_changed_during_upload_is_not_published(s3_env: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass's sha256 names the object; bytes read afterwards that do not hash to it abort the upload."""
    store = from_url("s3://bitplan-tests/changed", tmp_path, settings=SMALL_PARTS)
    _write(tmp_path / "big.bin", 6 * MiB, seed=3)
    monkeypatch.setattr(objects_s3, "file_sha256", lambda path: "f" * 64)
    with pytest.raises(ChecksumMismatch, match="changed"):
        store.put_file("models/changed/model.safetensors", tmp_path / "big.bin")
    assert not store.exists("models/changed/model.safetensors")
    assert _incomplete_uploads(store) == []


def test_corrupt_object_is_refused_on_download(s3_env: str, tmp_path: Path) -> None:
    store = from_url("s3://bitplan-tests/corrupt", tmp_path, settings=SMALL_PARTS)
    assert isinstance(store, S3ObjectStore)
    store.put_bytes("x", b"")  # creates the bucket
    store.client.put_object(Bucket=store.bucket, Key=store._name("a/weights.bin"), Body=b"tampered",
                            Metadata={"sha256": hashlib.sha256(b"original").hexdigest()})
    with pytest.raises(ChecksumMismatch):
        store.get_file("a/weights.bin", tmp_path / "weights.bin")
    assert not (tmp_path / "weights.bin").exists()


def test_presigned_url(store: ObjectStore) -> None:
    store.put_bytes("artifacts/c/model.gguf", b"gguf-bytes" * 1000)
    url = store.presigned_url("artifacts/c/model.gguf", expires_s=60)
    if isinstance(store, LocalObjectStore):
        assert url is None
        return
    assert url is not None
    assert httpx.get(url).content == b"gguf-bytes" * 1000
    assert httpx.get(url, headers={"Range": "bytes=4-9"}).content == b"-bytes"
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403


def test_bucket_created_when_missing(s3_env: str) -> None:
    import boto3
    import botocore.exceptions

    bucket = f"bitplan-new-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    with pytest.raises(botocore.exceptions.ClientError):
        client.head_bucket(Bucket=bucket)
    store = from_url(f"s3://{bucket}")
    assert store.list() == [] and not store.exists("x")  # reading a missing bucket is an empty store
    store.put_bytes("x", b"1")
    client.head_bucket(Bucket=bucket)
    assert [o.key for o in store.list()] == ["x"]


def test_abort_incomplete_uploads(s3_env: str, tmp_path: Path) -> None:
    store = from_url("s3://bitplan-tests/stale", tmp_path, settings=SMALL_PARTS)
    assert isinstance(store, S3ObjectStore)
    store.ensure_bucket()
    other = store.client.create_multipart_upload(Bucket=store.bucket, Key="elsewhere/x")
    store.client.create_multipart_upload(Bucket=store.bucket, Key=store._name("models/crashed"))
    assert store.abort_incomplete_uploads(older_than_s=3600) == 0
    assert store.abort_incomplete_uploads() == 1
    assert [u["Key"] for u in _incomplete_uploads(store)] == ["elsewhere/x"]  # other prefixes untouched
    store.client.abort_multipart_upload(Bucket=store.bucket, Key="elsewhere/x", UploadId=other["UploadId"])


@pytest.mark.parametrize("server", ["stopped", "silent"])
def test_unreachable_store_raises_unavailable_promptly(s3_env: str, tmp_path: Path, server: str) -> None:
    """Nothing listening (a stopped store), or a listener that never answers: ObjectStoreUnavailable in seconds."""
    pytest.importorskip("boto3")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    if server == "silent":
        silent.listen(8)
    port = silent.getsockname()[1]
    if server == "stopped":
        silent.close()
    settings = S3Settings(bucket="bitplan-tests", endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=0.5,
                          read_timeout_s=0.5, max_attempts=1)
    store = S3ObjectStore(settings)
    (tmp_path / "f").write_bytes(b"1")
    try:
        for action in (lambda: store.info("k"), lambda: store.put_file("k", tmp_path / "f"),
                       lambda: store.list("p/"), lambda: store.get_file("k", tmp_path / "g")):
            started = time.monotonic()
            with pytest.raises(ObjectStoreUnavailable, match="cannot be reached"):
                action()
            assert time.monotonic() - started < 5
    finally:
        silent.close()


def test_from_url_and_keys(tmp_path: Path) -> None:
    assert isinstance(from_url(str(tmp_path / "a")), LocalObjectStore)
    assert from_url(f"file://{tmp_path}/b").root == tmp_path / "b"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="must be 's3://bucket/prefix'"):
        from_url("gs://bucket/x")
    with pytest.raises(ValueError, match="bucket 'B' must be 3-63 characters"):
        S3Settings(bucket="B")
    store = LocalObjectStore(tmp_path / "c")
    for key in ("", "/abs", "a/../b", "a//b", "a\\b"):
        with pytest.raises(ValueError, match="must be a relative name"):
            store.put_bytes(key, b"")


# the model cache ------------------------------------------------------------------------------------------------


class CountingStore:
    """A store that counts and slows its downloads (to let fetches overlap)."""

    def __init__(self, inner: ObjectStore, delay_s: float = 0.0) -> None:
        self.inner, self.delay_s, self.downloads = inner, delay_s, []  # type: list[str]

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> objects.ObjectInfo:
        self.downloads.append(key)
        time.sleep(self.delay_s)
        return self.inner.get_file(key, dest, sha256=sha256)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def counting(tmp_path: Path) -> CountingStore:
    inner = LocalObjectStore(tmp_path / "store")
    for name in "abcde":
        inner.put_bytes(f"models/{name}.bin", name.encode() * 100)
    return CountingStore(inner)


def test_cache_keeps_its_bound_and_evicts_least_recently_used(counting: CountingStore, tmp_path: Path) -> None:
    cache = ModelCache(counting, tmp_path / "cache", max_bytes=250)  # type: ignore[arg-type]
    assert cache.fetch("models/a.bin").read_bytes() == b"a" * 100
    cache.fetch("models/b.bin")
    cache.fetch("models/a.bin")  # a hit: a is now the most recently used
    cache.fetch("models/c.bin")  # b goes
    assert sorted(cache.entries()) == ["models/a.bin", "models/c.bin"] and cache.total_bytes() == 200
    assert counting.downloads == ["models/a.bin", "models/b.bin", "models/c.bin"]
    for name in "dea":
        cache.fetch(f"models/{name}.bin")
        assert cache.total_bytes() <= 250
    assert sorted(cache.entries()) == ["models/a.bin", "models/e.bin"]
    assert len(list((tmp_path / "cache" / "entries").iterdir())) == 2


def test_cache_never_evicts_an_entry_in_use(counting: CountingStore, tmp_path: Path) -> None:
    cache = ModelCache(counting, tmp_path / "cache", max_bytes=250)  # type: ignore[arg-type]
    with cache.use("models/a.bin") as path:
        for name in "bcd":
            cache.fetch(f"models/{name}.bin")
        assert path.read_bytes() == b"a" * 100
    assert "models/a.bin" in cache.entries() and cache.total_bytes() <= 250


def test_cache_refuses_an_entry_larger_than_its_bound(counting: CountingStore, tmp_path: Path) -> None:
    cache = ModelCache(counting, tmp_path / "cache", max_bytes=50)  # type: ignore[arg-type]
    with pytest.raises(CacheTooSmall, match="needs 100 bytes, more than the cache's bound of 50"):
        cache.fetch("models/a.bin")
    assert counting.downloads == []


def test_cache_checks_sha256_and_keeps_nothing_on_mismatch(counting: CountingStore, tmp_path: Path) -> None:
    cache = ModelCache(counting, tmp_path / "cache", max_bytes=1000)  # type: ignore[arg-type]
    with pytest.raises(ChecksumMismatch):
        cache.fetch("models/a.bin", sha256="0" * 64)
    assert cache.entries() == {} and list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert cache.fetch("models/a.bin", sha256=hashlib.sha256(b"a" * 100).hexdigest()).is_file()


def test_concurrent_fetches_of_one_key_download_once(tmp_path: Path, counting: CountingStore) -> None:
    counting.delay_s = 0.3
    cache = ModelCache(counting, tmp_path / "cache", max_bytes=1000)  # type: ignore[arg-type]
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(cache.fetch("models/b.bin"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counting.downloads == ["models/b.bin"]
    assert len(set(paths)) == 1 and paths[0].read_bytes() == b"b" * 100


def test_cache_fetches_a_model_folder(store: ObjectStore, tmp_path: Path) -> None:
    """A model uploaded as a folder of objects comes back as one folder (from either store)."""
    (tmp_path / "src").mkdir()
    files = {"config.json": b"{}", "model.safetensors": b"w" * 3000, "tokenizer/tokenizer.json": b"t" * 10}
    for name, data in files.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)
        store.put_file(f"models/owner/m1/{name}", tmp_path / "src" / name)
    cache = ModelCache(store, tmp_path / "cache", max_bytes=10_000)
    folder = cache.fetch_tree("models/owner/m1")
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert cache.entries()["models/owner/m1/"]["size"] == sum(len(d) for d in files.values())
    with pytest.raises(FileNotFoundError, match="no objects under"):
        cache.fetch_tree("models/owner/none")
