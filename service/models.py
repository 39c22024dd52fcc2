"""GET /v1/models: one model per mode the KB can answer in (kinject-base, kinject-rag,
kinject-ft, kinject-ft-rag, kinject-auto); modes whose artifacts are missing are not listed."""
from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends

from kinject.core.answer import model_id
from kinject.service.errors import APIError
from kinject.service.protocol import ModelCard, ModelList
from kinject.service.state import ServiceState, get_state

router = APIRouter()


def cards(state: ServiceState) -> list[ModelCard]:
    return [ModelCard(id=model_id(m), kinject_mode=m, description=state.describe(m)) for m in state.answerer.available_modes()]


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: ServiceState = Depends(get_state)) -> ModelList:
    return ModelList(data=await anyio.to_thread.run_sync(cards, state))


@router.get("/v1/models/{model_id}", response_model=ModelCard)
async def get_model(model_id: str, state: ServiceState = Depends(get_state)) -> ModelCard:
    for card in await anyio.to_thread.run_sync(cards, state):
        if model_id in (card.id, card.kinject_mode):
            return card
    await anyio.to_thread.run_sync(state.mode_for, model_id)  # 404 naming what to build, or that the name is unknown
    raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
