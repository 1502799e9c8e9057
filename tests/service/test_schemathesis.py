"""schemathesis against the app with the schema in openapi.yaml (kept equal to the app's by test_app), on both
stores (SQLite and a real Redis): generated requests, a fixed number of seeded examples; no 5xx and every
response matches the schema. Then a stateful run: the operations chained by the links schemathesis infers from
the schema (a created job's id into its get, events, cancel, frontier; an uploaded latency table's id into its
get; a registered model's id into its get), a bounded number of steps, the same checks.

Its positive-data check is left out: a schema-valid body can still name a model that does not exist, which is
rightly a 422."""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, seed, settings  # noqa: E402

from bitplan.service.app import ServiceSettings, create_app  # noqa: E402
from tests.bitplan.test_latency import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261201


@pytest.fixture(params=["sqlite", "redis"])
def api_schema(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The schema in openapi.yaml bound to an API-only app on either store (no worker: jobs stay queued)."""
    redis_url = None
    if request.param == "redis":
        import redis

        redis_url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(redis_url).flushdb()
    app = create_app(ServiceSettings(data_dir=tmp_path / "data", embedded_worker=False, max_active_jobs=1000,
                                     redis_url=redis_url))
    with TestClient(app) as client:  # resources for the stateful links to start from (random ids only 404)
        for budget in (3.5, 4.0):
            created = client.post("/v1/jobs", json={"model": "smollm2-135m", "bits_per_weight": budget})
            assert created.status_code == 202, created.text
        assert client.post("/v1/latency-tables", json=table().to_json()).status_code == 201
    loaded = schemathesis.openapi.from_path(str(ROOT / "openapi.yaml"))
    loaded.app = app
    return loaded


def _excluded():  # type: ignore[no-untyped-def]
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    return [positive_data_acceptance]


def test_api_conforms(api_schema) -> None:  # type: ignore[no-untyped-def]
    """Every operation, 20 generated cases each (seeded, derandomized), every check but positive data."""
    from hypothesis import given

    excluded = _excluded()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        @given(case=operation.as_strategy())
        @seed(SEED)
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def conforms(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(excluded_checks=excluded)

        conforms()


def test_api_conforms_statefully(api_schema) -> None:  # type: ignore[no-untyped-def]
    machine = api_schema.as_state_machine()
    linked = [name for name in dir(machine) if name.startswith(("GET_", "POST_", "HEAD_", "DELETE_")) and "___" in name]
    assert len(linked) >= 10, linked  # links inferred from the schema: job ids, artifact ids, table ids, model ids
    excluded = _excluded()
    seen: set[tuple[str, str, int]] = set()

    class Checked(machine):  # type: ignore[misc,valid-type]
        def validate_response(self, response, case, **kwargs):  # type: ignore[no-untyped-def]
            case.validate_response(response, excluded_checks=excluded)

        def after_call(self, response, case):  # type: ignore[no-untyped-def]
            seen.add((case.method.upper(), case.path, response.status_code))

    Checked.run(settings=settings(max_examples=15, stateful_step_count=6, deadline=None, derandomize=True,
                                  suppress_health_check=list(HealthCheck)))
    assert not any(status >= 500 for _, _, status in seen), sorted(seen)
    # a linked step reached a real job: only an id taken from an earlier response gets a 200 here
    assert any(path.startswith("/v1/jobs/{job_id}") and status in (200, 202, 409) for _, path, status in seen), \
        sorted(seen)
