"""The FastAPI application. Routes only read and (later) enqueue; the pipeline runs in workers."""

from __future__ import annotations

from fastapi import FastAPI

from bitplan import __version__
from bitplan.models import BUNDLED_MODELS
from service.schemas import BundledModelPublic, Health


def create_app() -> FastAPI:
    app = FastAPI(title="bitplan", version=__version__,
                  description="Decide how many bits each part of a network gets, then quantize it.")

    @app.get("/healthz", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health(status="ok", version=__version__)

    @app.get("/v1/models", response_model=list[BundledModelPublic], tags=["models"])
    def list_models() -> list[BundledModelPublic]:
        return [BundledModelPublic(id=m.id, package=m.package.replace("_", "-"), description=m.description)
                for m in BUNDLED_MODELS.values()]

    return app


app = create_app()
