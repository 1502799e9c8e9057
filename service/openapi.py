"""Write the app's OpenAPI document: ``python -m service.openapi > openapi.yaml`` (a test checks for drift)."""

from __future__ import annotations

import sys

import yaml

from service.app import create_app


def render_openapi() -> str:
    return yaml.safe_dump(create_app().openapi(), sort_keys=False)


if __name__ == "__main__":
    sys.stdout.write(render_openapi())
