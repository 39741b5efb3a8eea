"""GET /v1/models: what is loaded (spec, backend, precision, limits)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import RuntimeDep, require_api_key
from ..errors import NotFound
from ..schemas import ModelCard, ModelList
from .common import ERROR_RESPONSES

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)])


@router.get(
    "",
    response_model=ModelList,
    responses={k: ERROR_RESPONSES[k] for k in (401, 503)},
    summary="The loaded model",
)
async def list_models(runtime: RuntimeDep) -> ModelList:
    runtime.require_ready()
    return ModelList(data=[ModelCard(**runtime.model_card())])


@router.get(
    "/{model_id}",
    response_model=ModelCard,
    responses={k: ERROR_RESPONSES[k] for k in (401, 404, 503)},
    summary="One model by id",
)
async def get_model(model_id: str, runtime: RuntimeDep) -> ModelCard:
    runtime.require_ready()
    card = runtime.model_card()
    if model_id != card["id"]:
        raise NotFound(f"no model {model_id!r}; loaded: {card['id']}", code="model_not_found")
    return ModelCard(**card)
