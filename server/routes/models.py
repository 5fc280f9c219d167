"""GET /v1/models: each chat model under its name and aliases, the routing alias, and the
embedding model (server/model_registry.py)."""

from fastapi import APIRouter, Request

from server.errors import ModelNotFoundError
from server.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1")


def _cards(request: Request) -> list[ModelCard]:
    return request.app.state.runtime.models.cards()


@router.get("/models", response_model=ModelList, summary="List the models this server serves.")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request))


@router.get("/models/{model_id:path}", response_model=ModelCard, summary="Describe one model.")
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in _cards(request):
        if card.id == model_id:
            return card
    raise ModelNotFoundError(f"The model `{model_id}` does not exist.", param="model")
