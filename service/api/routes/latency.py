"""``/v1/latency-tables``: latency tables measured on the machine that will run a model, uploaded for jobs that
plan for it (a job names one in ``latency_table``). Each key sees only its own."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fastapi import APIRouter, Query, Response

from bitplan.errors import BitplanError
from bitplan.quantizer.formats import FORMATS
from bitplan.report.latency import LatencyTable
from bitplan.service.api.deps import Owner, ServiceSettings, Settings
from bitplan.service.api.errors import ERRORS, http_error
from bitplan.service.api.pagination import CURSOR, after_cursor, one_page
from bitplan.service.schemas import LatencyTablePage, LatencyTablePublic, LatencyTableUpload

router = APIRouter(prefix="/v1/latency-tables", tags=["latency"], responses=ERRORS)


def tables_dir(settings: ServiceSettings, owner: str) -> Path:
    return settings.data_dir / "latency-tables" / hashlib.sha256(owner.encode()).hexdigest()[:32]


def table_path(settings: ServiceSettings, owner: str, table_id: str) -> Path:
    """The stored table ``table_id`` of ``owner`` (a 422 naming ``latency_table`` when there is none)."""
    path = tables_dir(settings, owner) / f"{table_id}.json"
    if len(table_id) != 64 or any(c not in "0123456789abcdef" for c in table_id) or not path.is_file():
        raise BitplanError(f"no uploaded latency table {table_id!r} for this key; upload one with POST "
                           "/v1/latency-tables", param="latency_table")
    return path


def _public(table: LatencyTable) -> LatencyTablePublic:
    return LatencyTablePublic(id=table.key, fingerprint=table.fingerprint, model_sha256=table.model_sha256,
                              types=table.types, decode_fixed_ms=table.decode_fixed_ms,
                              decode_ms_per_mweight=table.decode_ms_per_mweight)


@router.post("", status_code=201, response_model=LatencyTablePublic)
def upload_table(body: LatencyTableUpload, response: Response, owner: Owner, settings: Settings
                 ) -> LatencyTablePublic:
    table = LatencyTable.from_json(body.model_dump())
    ggml = {name for name, f in FORMATS.items() if f.ggml_type is not None}
    unknown = sorted(set(table.types) - ggml)
    if unknown:
        raise BitplanError(f"not GGML types: {', '.join(unknown)}", param="types")
    for part in ("decode_ms_per_mweight", "prefill_ms_per_mweight"):
        values = getattr(table, part)
        if set(values) != set(table.types) or not all(0 <= v <= 1e6 for v in values.values()):
            raise BitplanError(f"{part} must give every listed type a time from 0 to 1e6 ms", param=part)
    folder = tables_dir(settings, owner)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{table.key}.{os.getpid()}.tmp"
    staging.write_text(json.dumps(table.to_json(), sort_keys=True))
    os.replace(staging, folder / f"{table.key}.json")
    response.headers["Location"] = f"/v1/latency-tables/{table.key}"
    return _public(table)


@router.get("", response_model=LatencyTablePage)
def list_tables(owner: Owner, settings: Settings, cursor: str | None = CURSOR,
                limit: int = Query(default=100, ge=1, le=1000)) -> LatencyTablePage:
    """This key's uploaded tables, by id (one page; a table's cursor is its id)."""
    folder = tables_dir(settings, owner)
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    page = one_page(after_cursor(paths, cursor, lambda p: p.stem, limit), limit, lambda p: p.stem)
    return LatencyTablePage(**{**page, "items": [_public(LatencyTable.from_json(json.loads(p.read_text())))
                                                 for p in page["items"]]})


@router.get("/{table_id}", response_model=LatencyTablePublic)
def get_table(table_id: str, owner: Owner, settings: Settings) -> LatencyTablePublic:
    try:
        path = table_path(settings, owner, table_id)
    except BitplanError:
        raise http_error(404, f"no latency table {table_id!r}") from None
    return _public(LatencyTable.from_json(json.loads(path.read_text())))
