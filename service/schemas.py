"""HTTP schemas (pydantic v2), in one place."""

from __future__ import annotations

from pydantic import BaseModel


class Health(BaseModel):
    status: str
    version: str


class BundledModelPublic(BaseModel):
    id: str
    package: str
    description: str
