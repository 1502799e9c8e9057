"""schemathesis against the app with the schema in openapi.yaml (kept equal to the app's by test_app): generated
requests, bounded examples; no 5xx and every response matches the schema. Its positive-data check is left out:
a schema-valid body can still name a model that does not exist, which is rightly a 422."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from bitplan.service.app import ServiceSettings, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(tempfile.mkdtemp(prefix="bitplan-schemathesis-"))
APP = create_app(ServiceSettings(data_dir=DATA, embedded_worker=False, max_active_jobs=1000))
schema = schemathesis.openapi.from_path(str(ROOT / "openapi.yaml"))
schema.app = APP


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case) -> None:  # type: ignore[no-untyped-def]
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    case.call_and_validate(app=APP, excluded_checks=[positive_data_acceptance])
