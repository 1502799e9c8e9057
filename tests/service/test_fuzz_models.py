"""Fuzzing model files (issue 15): mutated tiny safetensors and GGUF files are registered through the API and
loaded by the pipeline's loader. Registration answers a clear 4xx (or accepts a mutation that is still valid),
never a 5xx or a hang; loading an accepted one either works or fails with ModelReferenceError (a job's
non-internal ``invalid_model`` failure), never anything else. A fixed, seeded number of cases; the long run is
``bench/fuzz_models.py``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings

from bitplan.errors import ModelReferenceError
from bitplan.service.app import ServiceSettings, create_app
from bitplan.sources.models import load_model
from tests.fuzz.model_files import gguf_mutation, mutate_gguf, mutate_safetensors, safetensors_mutation, write_tiny_gguf

CASES = 150


@pytest.fixture(scope="module")
def fuzz_env(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    base = Path(tempfile.mkdtemp(prefix="bitplan-fuzz-"))
    root = base / "root"
    shutil.copytree(tiny_llama_dir, root / "st")
    write_tiny_gguf(base / "tiny.gguf")
    app = create_app(ServiceSettings(data_dir=base / "data", model_roots=[root], embedded_worker=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, root, (tiny_llama_dir / "model.safetensors").read_bytes(), (base / "tiny.gguf").read_bytes()
    shutil.rmtree(base, ignore_errors=True)


def _check(client: TestClient, reference: str, path: Path) -> None:
    response = client.post("/v1/models", json={"reference": reference})
    assert response.status_code in (201, 413, 422), response.text
    assert response.headers["content-type"].startswith("application/") and "Traceback" not in response.text
    if response.status_code == 201:
        try:
            load_model(str(path))
        except ModelReferenceError:
            pass


@seed(15)
@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(mutation=safetensors_mutation())
def test_issue15_fuzzed_safetensors_get_a_4xx_never_a_5xx(fuzz_env, mutation) -> None:  # type: ignore[no-untyped-def]
    client, root, original, _ = fuzz_env
    (root / "st" / "model.safetensors").write_bytes(mutate_safetensors(original, mutation))
    _check(client, "st", root / "st")


@seed(15)
@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(mutation=gguf_mutation())
def test_issue15_fuzzed_gguf_get_a_4xx_never_a_5xx(fuzz_env, mutation) -> None:  # type: ignore[no-untyped-def]
    client, root, _, original = fuzz_env
    (root / "m.gguf").write_bytes(mutate_gguf(original, mutation))
    _check(client, "m.gguf", root / "m.gguf")
