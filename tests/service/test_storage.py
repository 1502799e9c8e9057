"""Where artifacts and job inputs live (``bitplan.service.storage``, issue 44): a folder other than the data folder,
byte ranges served from the object store, an attempt that waits out a restarting store, and two jobs reading one
cached model side by side."""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from bitplan.service.api.ranges import parse_range
from bitplan.service.model_cache import ModelCache
from bitplan.service.objects import LocalObjectStore, ObjectStoreUnavailable
from bitplan.service.storage import Storage, call_leased


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-9", (0, 10)), ("bytes=10-", (10, 100)), ("bytes=-5", (95, 100)),
    ("bytes=90-200", (90, 100)), ("bytes=100-", False), ("bytes=-0", False), ("bytes=9-3", False),
    ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=-", None)])
def test_issue44_range_header_of_a_100_byte_object(header: str | None, expected: object) -> None:
    """One range is served (clamped to the object), several or another unit give the whole object (RFC 9110 lets
    a server ignore them), one past the end is unsatisfiable (416)."""
    assert parse_range(header, 100) == expected


def _artifact(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "quantized.safetensors").write_bytes(b"q" * 40)
    digest = "7d5f79a0f8a2d1c0a25b3b5e6e1b0f0c2b6b1d5d6b5e8b6a0d2e6f1c4b6a8e2f"
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {"quantized.safetensors": digest}}))
    return folder


def test_issue44_a_local_store_folder_holds_the_artifacts(tmp_path: Path) -> None:
    """``--store file:///elsewhere``: artifacts there, the data folder keeps none; deleting frees their bytes."""
    storage = Storage(tmp_path / "data", (tmp_path / "elsewhere").as_uri())
    assert not storage.remote and storage.root == tmp_path / "elsewhere"
    storage.publish("job-0", 1, _artifact(tmp_path / "data" / "staging" / "0"))
    assert (tmp_path / "elsewhere" / "artifacts" / "job-0" / "quantized.safetensors").read_bytes() == b"q" * 40
    assert not (tmp_path / "data" / "artifacts").exists() and not (tmp_path / "data" / "staging" / "0").exists()
    assert storage.artifact_ids() == ["job-0"] and storage.read("job-0", 1, "missing.json") is None
    size = (tmp_path / "elsewhere" / "artifacts" / "job-0" / "manifest.json").stat().st_size
    assert storage.delete_artifact("job-0") == 40 + size and storage.artifact_ids() == []
    request = {"model": str(tmp_path / "model"), "budget": {"latency_table": None}}
    assert storage.push_inputs(request) is request  # a folder store: paths stay paths


def test_issue44_an_attempt_waits_out_a_restarting_store_keeping_its_lease() -> None:
    beats: list[float] = []
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ObjectStoreUnavailable("the object store cannot be reached")
        return "pushed"

    assert call_leased(flaky, heartbeat=lambda: beats.append(time.monotonic()), every_s=0.05, store_wait_s=30,
                       stopping=threading.Event()) == "pushed"
    assert len(calls) == 3 and len(beats) >= 2  # the lease was kept between the tries

    def down() -> None:
        raise ObjectStoreUnavailable("the object store cannot be reached")

    started = time.monotonic()
    with pytest.raises(ObjectStoreUnavailable, match="cannot be reached"):
        call_leased(down, heartbeat=lambda: None, every_s=0.05, store_wait_s=0.2, stopping=threading.Event())
    assert time.monotonic() - started < 10


def test_issue44_two_jobs_read_one_cached_model_side_by_side(tmp_path: Path) -> None:
    """An entry in use is held shared: a second job on the same model gets it at once (it used to wait for the
    first job to end), and eviction still skips it."""
    store = LocalObjectStore(tmp_path / "store")
    store.put_bytes("models/m/config.json", b"{}")
    cache = ModelCache(store, tmp_path / "cache", max_bytes=1000)
    held, release = threading.Event(), threading.Event()

    def first_job() -> None:
        with cache.use_tree("models/m"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=first_job)
    thread.start()
    try:
        assert held.wait(30)
        started = time.monotonic()
        with cache.use_tree("models/m") as folder:
            assert (folder / "config.json").read_bytes() == b"{}"
        assert time.monotonic() - started < 2
    finally:
        release.set()
        thread.join(30)


def test_issue44_a_worker_without_the_store_says_so(tmp_path: Path) -> None:
    """A job that names objects, taken by a worker started without ``--store``: a clear reason, not a bad path."""
    storage = Storage(tmp_path / "data")
    request = {"model": "objects:models/abc", "budget": {"latency_table": None}}
    assert storage.names_objects(request) and not storage.names_objects({**request, "model": "smollm2-135m"})
    with ExitStack() as held, pytest.raises(FileNotFoundError, match="this worker has none: start it with the "
                                                                        "API's --store URL"):
        storage.local_inputs(request, held)
