"""Write the app's OpenAPI document: ``python -m service.openapi > openapi.yaml`` (a test checks for drift)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

from bitplan.service.app import ServiceSettings, create_app


def render_openapi() -> str:
    with tempfile.TemporaryDirectory() as folder:
        app = create_app(ServiceSettings(data_dir=Path(folder), embedded_worker=False))
        try:
            return yaml.safe_dump(app.openapi(), sort_keys=False)
        finally:
            app.state.store.close()


if __name__ == "__main__":
    sys.stdout.write(render_openapi())
