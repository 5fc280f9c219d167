"""GET /v1/models: each chat model under its name and aliases, the routing alias, and the
embedding model."""

from fastapi import APIRouter, Request

from server.errors import ModelNotFoundError
from server.protocol import ModelCard, ModelList

router = APIRouter(prefix="/v1")


def _cards(request: Request) -> list[ModelCard]:
    runtime = request.app.state.runtime
    created = runtime.started
    if not runtime.servings:  # still loading: what the profile says
        cards = [ModelCard(id=name, created=created, root=runtime.model_name, max_model_len=runtime.max_model_len) for name in runtime.served_names]
    else:
        cards = [
            ModelCard(id=name, created=created, root=serving.model, max_model_len=serving.engine.max_model_len)
            for serving in runtime.servings.values()
            for name in serving.served_names
        ]
    if runtime.router is not None:
        # The alias's window is the smallest of its tiers': a request that fits it fits all.
        windows = [card.max_model_len for card in cards if card.max_model_len and card.root in runtime.router.config.tiers.values()]
        cards.append(ModelCard(id=runtime.router.alias, created=created, root=runtime.router.alias, max_model_len=min(windows) if windows else None))
    if runtime.embedding_name:
        cards.append(ModelCard(id=runtime.embedding_name, created=created, root=runtime.embedding_name, kind="embedding"))
    return cards


@router.get("/models", response_model=ModelList, summary="List the models this server serves.")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request))


@router.get("/models/{model_id:path}", response_model=ModelCard, summary="Describe one model.")
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in _cards(request):
        if card.id == model_id:
            return card
    raise ModelNotFoundError(f"The model `{model_id}` does not exist.", param="model")
