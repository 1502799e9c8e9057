"""``/v1/models``: the bundled models and the model references each key registered."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from bitplan.service.api.deps import Owner, Settings, Store
from bitplan.service.api.errors import ERRORS, http_error
from bitplan.service.api.pagination import CURSOR, after_cursor, one_page
from bitplan.service.schemas import ModelCreate, ModelPage, ModelPublic
from bitplan.sources.models import BUNDLED_MODELS, resolve_reference
from bitplan.sources.references import check_reference, reference_bytes

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)


def bundled_public(model_id: str) -> ModelPublic:
    model = BUNDLED_MODELS[model_id]
    return ModelPublic(id=model.id, name=model.description, reference=model.id, format="bundled", bytes=None,
                       created=0.0)


@router.get("", response_model=ModelPage)
def list_models(owner: Owner, store: Store, cursor: str | None = CURSOR,
                limit: int = Query(default=100, ge=1, le=1000)) -> ModelPage:
    """The bundled models, then the references this key registered, oldest first (one page; a model's cursor
    is its id)."""
    models = [bundled_public(m) for m in BUNDLED_MODELS] + [ModelPublic(**m) for m in store.list_model_records(owner)]
    return ModelPage(**one_page(after_cursor(models, cursor, lambda m: m.id, limit), limit, lambda m: m.id))


@router.post("", status_code=201, response_model=ModelPublic)
def register_model(body: ModelCreate, response: Response, owner: Owner, store: Store,
                   settings: Settings) -> ModelPublic:
    reference = check_reference(body.reference, roots=settings.model_roots, max_bytes=settings.max_model_bytes)
    kind, path = resolve_reference(reference)
    size = None if reference in BUNDLED_MODELS else reference_bytes(kind, path)
    model = store.add_model(owner, {"name": body.name, "reference": reference, "format": kind, "bytes": size})
    response.headers["Location"] = f"/v1/models/{model['id']}"
    return ModelPublic(**model)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, owner: Owner, store: Store) -> ModelPublic:
    if model_id in BUNDLED_MODELS:
        return bundled_public(model_id)
    model = store.get_model(owner, model_id)
    if model is None:
        raise http_error(404, f"no model {model_id!r}")
    return ModelPublic(**model)
