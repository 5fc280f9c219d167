"""POST /v1/embeddings."""

from fastapi import APIRouter, Depends, Request

from server.auth import Principal, authorize
from server.embedder import encode_base64
from server.errors import InvalidRequestError, ModelNotFoundError
from server.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage, ErrorResponse

router = APIRouter(prefix="/v1")


@router.post(
    "/embeddings",
    response_model=EmbeddingList,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    summary="Embed texts with the local sentence-transformers model.",
)
async def create_embeddings(body: EmbeddingRequest, request: Request, principal: Principal = Depends(authorize)) -> EmbeddingList:
    runtime = request.app.state.runtime
    embedder = runtime.require_embedder()
    if body.model != embedder.name:
        raise ModelNotFoundError(f"The model `{body.model}` does not exist or is not an embedding model.", param="model")
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise InvalidRequestError(f"{embedder.name} produces {embedder.dimensions} dimensions; it cannot be shortened", param="dimensions")
    texts = embedder.texts_from_input(body.input)
    if len(texts) > runtime.settings.max_embedding_inputs:
        raise InvalidRequestError(f"at most {runtime.settings.max_embedding_inputs} inputs per request", param="input")
    counts = embedder.count_tokens(texts)
    for i, count in enumerate(counts):
        if count > embedder.max_tokens:
            raise InvalidRequestError(
                f"input[{i}] has {count} tokens; {embedder.name} accepts at most {embedder.max_tokens}",
                param="input",
                code="context_length_exceeded",
            )
    vectors = await embedder.embed(texts)
    runtime.metrics.embedding_inputs.labels(model=embedder.name).inc(len(texts))
    data = [
        Embedding(index=i, embedding=encode_base64(v) if body.encoding_format == "base64" else v.tolist())
        for i, v in enumerate(vectors)
    ]
    total = sum(counts)
    return EmbeddingList(data=data, model=embedder.name, usage=EmbeddingUsage(prompt_tokens=total, total_tokens=total))
