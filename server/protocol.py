"""OpenAI wire format: request and response models, error body, streaming chunks.

Fields follow OpenAI's order and names. Requests accept unknown fields (clients send
new ones before we know them) and log what was ignored. Our own and vLLM-compatible
extensions sit in one marked block per model. Requests turn themselves into engine
GenerationParams, so the serving layer holds no field-by-field mapping.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.base import GenerationParams, TokenLogprob
from server.errors import ContextLengthExceededError, InvalidRequestError
from server.toolcalls.constraint import ANY_OBJECT as JSON_OBJECT_SCHEMA
from server.toolcalls.constraint import response_format_regex
from server.toolcalls.format import call_text

log = logging.getLogger(__name__)

# A seed is a 64-bit signed integer (the engine's random generator takes no more).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class OpenAIModel(BaseModel):
    """Base for requests: unknown fields are kept, logged once per request, not used."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored(self) -> OpenAIModel:
        if self.model_extra:
            log.info("ignored request fields: %s", ", ".join(sorted(self.model_extra)))
        return self


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------- chat completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    def text(self, index: int) -> str:
        """Content as plain text; parts other than text are refused (text-only models)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"messages[{index}].content[{j}] is of type {part.get('type')!r}; this model accepts text parts only",
                    param=f"messages.{index}.content.{j}",
                    code="unsupported_content",
                )
            texts.append(part["text"])
        return "".join(texts)


class JsonSchemaFormat(BaseModel):
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class CacheControl(BaseModel):
    """A request's say over the response cache (LiteLLM's spelling): `no-cache` skips
    the lookup (the fresh answer is still kept), `no-store` keeps the answer out."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    no_cache: bool = Field(False, alias="no-cache")
    no_store: bool = Field(False, alias="no-store")


# `cache` of a request: true (use it; what opts in under mode opt_in), false (neither look
# up nor keep), an object (CacheControl), or absent (the deployment's mode decides).
CacheField = bool | CacheControl | None


class ChatCompletionRequest(OpenAIModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    parallel_tool_calls: bool | None = None
    tool_choice: Any = None
    tools: list[dict[str, Any]] | None = None
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None

    # --- extensions (vLLM-compatible sampling controls) ---
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # --- extensions (memory): a client-chosen conversation name makes the server keep
    # the history (send only the new messages) and use the user's episodic memory;
    # vector_store_ids retrieve knowledge for the turn (default: the API key's stores).
    conversation: str | None = Field(None, min_length=1, max_length=256)
    vector_store_ids: list[str] | None = None
    # --- extension (response cache, server/memory/response_cache.py)
    cache: CacheField = None

    def chat_messages(self, stored_history: bool = False) -> list[dict[str, str]]:
        """Messages for the chat template. `developer` is the newer name of `system`;
        assistant tool calls are written as the model writes them (toolcalls.format), and
        each `tool` message must answer a call made earlier in the conversation (in a
        stored conversation the call may be in the stored history instead)."""
        out: list[dict[str, str]] = []
        call_ids: set[str] = set()
        for i, m in enumerate(self.messages):
            text = m.text(i)
            if m.role == "assistant" and m.tool_calls:
                for j, call in enumerate(m.tool_calls):
                    fn = call.get("function")
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
                        raise InvalidRequestError(
                            f"messages[{i}].tool_calls[{j}] needs function.name and function.arguments (a JSON string)",
                            param=f"messages.{i}.tool_calls.{j}",
                        )
                    if isinstance(call.get("id"), str):
                        call_ids.add(call["id"])
                text = (text + "\n" if text else "") + call_text(m.tool_calls)
            elif m.role == "tool":
                if not m.tool_call_id:
                    raise InvalidRequestError(f"messages[{i}]: a tool message needs tool_call_id", param=f"messages.{i}.tool_call_id")
                if m.tool_call_id not in call_ids and not stored_history:
                    raise InvalidRequestError(
                        f"messages[{i}]: tool_call_id {m.tool_call_id!r} does not answer any earlier assistant tool call",
                        param=f"messages.{i}.tool_call_id",
                    )
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise InvalidRequestError("stop accepts at most 4 sequences", param="stop")
        if any(not s for s in stops):
            raise InvalidRequestError("stop sequences must not be empty", param="stop")
        return tuple(stops)

    def json_schema(self) -> dict[str, Any] | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return JSON_OBJECT_SCHEMA
        assert fmt.json_schema is not None
        # OpenAI's default for a json_schema without a schema is "any JSON object".
        schema = fmt.json_schema.schema_ or JSON_OBJECT_SCHEMA
        response_format_regex(schema)  # a schema that cannot be enforced is a 400 now, not mid-stream
        return schema

    def to_generation_params(self, prompt_tokens: int, max_model_len: int) -> GenerationParams:
        """Validate the request against the context window and build engine parameters."""
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if prompt_tokens >= max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens. "
                f"However, your messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        room = max_model_len - prompt_tokens
        requested = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if requested is not None and requested > room:
            param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise ContextLengthExceededError(
                f"{param} is too large: {requested}. This model's maximum context length is {max_model_len} tokens "
                f"and your request has {prompt_tokens} input tokens ({requested} > {max_model_len} - {prompt_tokens}).",
                param=param,
            )
        max_tokens = requested if requested is not None else room
        if self.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed the tokens this request may generate ({max_tokens})", param="min_tokens"
            )
        return GenerationParams(
            max_tokens=max_tokens,
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stop_list(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            json_schema=self.json_schema(),
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage

    # --- extensions: server-side tools ---
    # Calls the server ran itself during this turn (the model never returned them).
    server_tool_calls: list[dict[str, Any]] | None = None
    # A destructive call waiting for the user's (or an operator's) confirmation.
    pending_action: dict[str, Any] | None = None

    # --- extensions: memory and knowledge (stateful turns only) ---
    # The stored conversation this turn belongs to.
    conversation: str | None = None
    # How the context window was assembled: turns verbatim, turns in the summary.
    context_window: dict[str, Any] | None = None
    # The user's memories recalled into this turn's context.
    recalled_memories: list[dict[str, Any]] | None = None
    # The knowledge chunks the answer was grounded on, numbered as the model cites them ([1]).
    citations: list[dict[str, Any]] | None = None

    # --- extensions: guardrails ---
    # Each rail that masked, neutralised or blocked something in this turn: stage, rail,
    # action and reason (never the text it matched).
    guardrails: list[dict[str, str]] | None = None

    # --- extensions: cost ---
    # Engine time attributed to this turn and its price at the profile's hourly cost
    # (also in GET /v1/usage and the turn's trace, whose id is the x-trace-id header).
    cost: dict[str, Any] | None = None
    # --- extensions: routing ---
    # Where a turn asked for under a routing alias went, and why (server/routing.py).
    routing: dict[str, Any] | None = None
    # --- extensions: response cache ---
    # Whether the answer came from the cache (status "hit": kind exact or semantic, the
    # entry's id, similarity, when it was kept) or was generated ("miss", with the id it
    # was kept under); null when the cache was not used for the turn.
    cache: dict[str, Any] | None = None
    # --- extensions: tool choice ---
    # The tools the server ranked for this turn (name and score, best first) and which it
    # offered the model (server/toolcalls/shortlist.py); null when it offered them all.
    tool_shortlist: dict[str, Any] | None = None
    # --- extensions: answers from evidence ---
    # The sentences the answer was chosen among (text, source number or "user",
    # similarity, the model's probability when it chose), which was chosen, and whether
    # the answer was built from one (server/turn/source_answer.py); null when not tried.
    source_answer: dict[str, Any] | None = None
    # --- extensions: agents ---
    # For a turn asked for as `agent:<name>`: the agent asked, the one that answered,
    # whether it held the conversation, each handoff decision, the tools it brought, and
    # (once settled) usage per agent (server/agents).
    agent: dict[str, Any] | None = None
    # --- extensions: workflows ---
    # For a turn asked for as `workflow:<name>`: the nodes this turn ran (`path`),
    # whether it resumed a paused run, and the run (id, node, status, typed state)
    # (server/workflows).
    workflow: dict[str, Any] | None = None


def logprobs_out(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    def encoded(token: str) -> list[int]:
        return list(token.encode("utf-8"))

    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": encoded(e.token),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": encoded(t)} for t, lp in e.top],
        }
        for e in entries
    ]


def chunk_json(
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`. Built as a dict, not a model: it is the hot path of
    streaming, and the shape is fixed by OpenAI."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chunk_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "logprobs": {"content": logprobs_out(logprobs)} if logprobs is not None else None,
        "finish_reason": finish_reason,
    }


# ---------------------------------------------------------------- responses


class ResponsesRequest(OpenAIModel):
    """POST /v1/responses. Sampling fields map onto chat completions (`chat_request`)."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    store: bool = True
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_output_tokens: int | None = Field(None, ge=1)
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    # Open Responses fields: sampling ones map onto chat completions; the rest are echoed.
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tool_calls: int | None = Field(None, ge=1)
    reasoning: dict[str, Any] | None = None
    # Background mode needs a job store and polling; the server answers in the request.
    background: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = Field(None, max_length=256)
    # Extension: the response cache, as on chat completions.
    cache: CacheField = None

    def conversation_name(self) -> str | None:
        conv = self.conversation
        if isinstance(conv, dict):
            conv = conv.get("id")
            if not isinstance(conv, str):
                raise InvalidRequestError("conversation must be a string or an object with an id", param="conversation")
        return conv or None


# ---------------------------------------------------------------- embeddings


class EmbeddingRequest(OpenAIModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "enclave"

    # --- extensions ---
    root: str | None = None
    max_model_len: int | None = None
    kind: Literal["chat", "embedding", "agent", "workflow"] = "chat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
