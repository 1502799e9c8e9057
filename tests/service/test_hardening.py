"""Regression tests for the faults found by attacking the service (issue 15), each named after its fault, on both
stores where the fault involves the store."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from bitplan.errors import ModelReferenceError
from bitplan.service.app import ServiceSettings, create_app
from bitplan.sources.models import load_model


@pytest.fixture(params=["sqlite", "redis"])
def api(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An API-only service (no worker) with ``tmp_path/root`` as its model root, on either store."""
    root = tmp_path / "root"
    root.mkdir()
    redis_url = None
    if request.param == "redis":
        import redis

        redis_url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(redis_url).flushdb()
    settings = ServiceSettings(data_dir=tmp_path / "data", model_roots=[root], embedded_worker=False,
                               redis_url=redis_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.root = root  # type: ignore[attr-defined]
        yield client


def _copy_model(tiny_llama_dir: Path, root: Path, name: str = "tiny") -> Path:
    target = root / name
    shutil.copytree(tiny_llama_dir, target)
    return target


def test_issue15_fault1_nul_byte_in_a_model_reference_is_a_422(api: TestClient) -> None:
    for path, body in (("/v1/jobs", {"model": "tiny\x00x", "bits_per_weight": 4.0}),
                       ("/v1/models", {"reference": "tiny\x00x"})):
        response = api.post(path, json=body)
        assert response.status_code == 422 and "NUL" in response.json()["detail"], response.text


def test_issue15_fault2_oversized_integers_are_4xx_not_500(api: TestClient, tiny_llama_dir: Path) -> None:
    _copy_model(tiny_llama_dir, api.root)  # type: ignore[attr-defined]
    job = api.post("/v1/jobs", json={"model": "tiny", "uniform_bits": 4}).json()
    for after in ("9223372036854775808", "9223372036854775807", str(10**30)):
        response = api.get(f"/v1/jobs/{job['id']}/events", params={"after": after})
        assert response.status_code == 422, response.text
    api.post(f"/v1/jobs/{job['id']}/cancel")  # terminal: the stream ends by itself
    stream = api.get(f"/v1/jobs/{job['id']}/events/stream", headers={"Last-Event-ID": "9" * 30})
    assert stream.status_code == 200 and "Traceback" not in stream.text


def test_issue15_fault4_a_symlink_out_of_the_root_is_refused(api: TestClient, tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    folder = _copy_model(tiny_llama_dir, api.root)  # type: ignore[attr-defined]
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    os.symlink(outside, folder / "model.safetensors")
    for path, body in (("/v1/jobs", {"model": "tiny", "bits_per_weight": 4.0}), ("/v1/models", {"reference": "tiny"})):
        response = api.post(path, json=body)
        assert response.status_code == 422 and "links outside the allowed roots" in response.text, response.text


def test_issue15_fault11_a_fifo_where_a_model_file_should_be_is_refused_at_once(api: TestClient,
                                                                               tiny_llama_dir: Path) -> None:
    folder = _copy_model(tiny_llama_dir, api.root)  # type: ignore[attr-defined]
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    response = api.post("/v1/models", json={"reference": "tiny"})
    assert response.status_code == 422 and "not a regular file" in response.text, response.text


def _rewrite_header(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (length - len(encoded)) if len(encoded) <= length else b""
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


@pytest.mark.parametrize("fault", ["overlapping offsets", "negative dimension"])
def test_issue15_fault10_bad_tensor_headers_fail_registration(api: TestClient, tiny_llama_dir: Path,
                                                              fault: str) -> None:
    folder = _copy_model(tiny_llama_dir, api.root)  # type: ignore[attr-defined]

    def overlap(header: dict) -> None:
        norms = sorted(n for n in header if n.endswith("layernorm.weight"))  # same shape and dtype
        header[norms[1]]["data_offsets"] = header[norms[0]]["data_offsets"]

    def negative(header: dict) -> None:
        name = next(n for n in header if n != "__metadata__" and len(header[n]["shape"]) == 2)
        rows, cols = header[name]["shape"]
        header[name]["shape"] = [-rows, -cols]

    _rewrite_header(folder / "model.safetensors", overlap if fault == "overlapping offsets" else negative)
    response = api.post("/v1/models", json={"reference": "tiny"})
    expected = "overlap" if fault == "overlapping offsets" else "negative dimension"
    assert response.status_code == 422 and expected in response.text, response.text


def test_issue15_fault5_a_missing_weight_is_refused_not_randomly_initialized(tiny_llama_dir: Path,
                                                                            tmp_path: Path) -> None:
    folder = _copy_model(tiny_llama_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelReferenceError, match="lacks 1 weights the config needs"):
        load_model(str(folder))


def test_issue15_fault10_a_malformed_config_is_bad_input_not_an_internal_error(tiny_llama_dir: Path,
                                                                              tmp_path: Path) -> None:
    folder = _copy_model(tiny_llama_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "abc"}))
    with pytest.raises(ModelReferenceError, match="cannot"):
        load_model(str(folder))


def test_issue14_errors_are_problem_details_without_server_paths(api: TestClient, tiny_llama_dir: Path) -> None:
    folder = _copy_model(tiny_llama_dir, api.root)  # type: ignore[attr-defined]
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    refused = api.post("/v1/models", json={"reference": "tiny"})
    body = refused.json()
    assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
    assert {"type", "title", "status", "detail", "code"} <= set(body) and body["status"] == 422
    assert body["code"] == "invalid_model" and body["param"] == "model"
    assert str(api.root) not in body["detail"] and "tiny/model.safetensors" in body["detail"]  # type: ignore
    missing = api.get("/v1/jobs/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert missing.headers["content-type"] == "application/problem+json"
    invalid = api.post("/v1/jobs", json={"model": "smollm2-135m", "bits_per_weight": 3.5, "solver": "nope"}).json()
    assert invalid["code"] == "invalid_option" and invalid["param"] == "solver"


def test_issue15_fault7_redis_down_is_503_with_retry_after_and_readyz_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ServiceSettings(data_dir=tmp_path / "data", embedded_worker=False,
                               redis_url=f"redis://127.0.0.1:{port}/0")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "Redis" in ready.json()["detail"] and ready.headers["Retry-After"]
        for response in (client.get("/v1/jobs"), client.get("/v1/models"),
                         client.post("/v1/jobs", json={"model": "smollm2-135m", "uniform_bits": 4})):
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] and response.json()["code"] == "store_unavailable"


def test_issue15_fault12_a_full_disk_is_507_and_not_ready_then_recovers(tmp_path: Path) -> None:
    """On a small tmpfs (root only: CI runs as root); the job store's file fills up."""
    import subprocess

    data = tmp_path / "small"
    data.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        settings = ServiceSettings(data_dir=data, embedded_worker=False, min_free_bytes=256 * 1024,
                                   max_active_jobs=10_000)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            assert client.get("/readyz").status_code == 200
            filler = data / "filler"
            try:
                with filler.open("wb") as handle:
                    while True:
                        handle.write(b"x" * 4096)
                        handle.flush()
            except OSError:
                pass
            body = {"model": "smollm2-135m", "uniform_bits": 4, "pinned": ["x" * 1000 + "=4"] * 40}
            statuses = {client.post("/v1/jobs", json={**body, "seed": n}).status_code for n in range(20)}
            assert 500 not in statuses and 507 in statuses, statuses
            assert client.get("/readyz").status_code == 503
            filler.unlink()
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/jobs", json={"model": "smollm2-135m", "uniform_bits": 4}).status_code == 202
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_issue15_fault3_a_chunked_body_over_the_limit_is_refused_while_read(api: TestClient) -> None:
    def chunks():  # no Content-Length: the client sends it chunked
        for _ in range(300):
            yield b"x" * 1024

    response = api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["code"] == "too_large", response.text


def test_issue14_client_retries_429_and_503_honouring_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from bitplan.service.client import Client, ServiceError

    answers = iter([httpx.Response(503, headers={"Retry-After": "0"}), httpx.Response(429,
                                                                                      headers={"Retry-After": "0"}),
                    httpx.Response(200, json={"items": [], "next_cursor": None})])
    monkeypatch.setenv("BITPLAN_URL", "http://127.0.0.1:9")
    client = Client(backoff_s=0.0)
    client.http = httpx.Client(base_url="http://127.0.0.1:9", transport=httpx.MockTransport(lambda _: next(answers)))
    assert client.request("GET", "/v1/jobs").json() == {"items": [], "next_cursor": None}
    refused = httpx.Response(422, json={"type": "t", "title": "x", "status": 422, "detail": "bad",
                                        "code": "invalid_option",
                                        "param": "solver"})
    client.http = httpx.Client(base_url="http://127.0.0.1:9", transport=httpx.MockTransport(lambda _: refused))
    with pytest.raises(ServiceError) as caught:
        client.request("POST", "/v1/jobs", json={})
    assert caught.value.code == "invalid_option" and caught.value.param == "solver"


def test_issue14_cancelling_a_finished_job_is_409(api: TestClient) -> None:
    store = api.app.state.store  # type: ignore[attr-defined]
    job, _ = store.create("local", {"model": "m"}, None)
    store.finish(job.id, store.claim(job.id, lease_s=30), "succeeded", result={})
    refused = api.post(f"/v1/jobs/{job.id}/cancel")
    assert refused.status_code == 409 and refused.json()["code"] == "conflict"
    assert store.get(job.id).status == "succeeded"
