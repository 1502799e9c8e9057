"""The HTTP app: meta routes, and openapi.yaml kept in sync with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bitplan.service.app import ServiceSettings, create_app
from bitplan.service.openapi import render_openapi

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    return TestClient(create_app(ServiceSettings(data_dir=tmp_path_factory.mktemp("service"), embedded_worker=False)))


def test_health(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_models(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    assert {"smollm2-135m", "minilm-l6"} <= {m["id"] for m in response.json()["items"]}


def test_unknown_route_is_404(client: TestClient) -> None:
    assert client.get("/v1/nothing").status_code == 404


def test_openapi_yaml_is_in_sync() -> None:
    assert (ROOT / "openapi.yaml").read_text() == render_openapi(), \
        "openapi.yaml is stale: run python -m bitplan.service.openapi > openapi.yaml"


def test_metrics_count_jobs_and_requests(client: TestClient) -> None:
    client.get("/healthz")
    text = client.get("/metrics").text
    assert 'bitplan_jobs{status="queued"}' in text and "bitplan_queue_pending" in text
    assert 'bitplan_http_requests_total{method="GET",status="200"}' in text
    assert client.get("/readyz").json()["status"] == "ready"
