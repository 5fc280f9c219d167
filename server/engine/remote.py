"""RemoteEngine: the Engine on one or more OpenAI-compatible vLLM servers.

The turn pipeline renders the chat template and builds its constraints itself, so this
engine sends exactly what the in-process one gives vLLM: the prompt as token ids to
`/v1/completions`, the sampling parameters, and the regex or JSON schema as vLLM's
`structured_outputs`; it asks for the generated token ids back (`return_token_ids`) so
usage stays exact.

Requests go to the healthy upstream with the fewest requests outstanding. A request
that fails before its first token (connection refused, reset, a 5xx) is retried on
another upstream, and the failed one is marked down until a health check (`/health`)
finds it up again; once tokens have streamed, a failure ends the request with an error,
since a retry would repeat what the client has already seen. Closing the stream (a
client that left, an abort) drops the HTTP connection, which makes vLLM abort the
request upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.engine.base import Engine, GenerationChunk, GenerationParams, TokenLogprob
from server.errors import EngineError, InvalidRequestError, ServiceUnavailableError
from server.toolcalls.constraint import response_format_regex

log = logging.getLogger(__name__)


@dataclass
class Upstream:
    url: str  # base URL ending in /v1
    outstanding: int = 0
    healthy: bool = True
    streams: dict[str, httpx.Response] = field(default_factory=dict)


class _Retryable(Exception):
    """The upstream failed before producing anything: another one may serve it."""


class RemoteEngine(Engine):
    def __init__(
        self,
        upstreams: list[str],
        upstream_model: str,
        served_model: str,
        tokenizer: Any,
        max_model_len: int,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        health_interval_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not upstreams:
            raise ValueError("a remote engine needs at least one upstream")
        self.upstreams = [Upstream(u.rstrip("/")) for u in upstreams]
        self.upstream_model = upstream_model
        self.served_model = served_model
        self.max_model_len = max_model_len
        self._tokenizer = tokenizer
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout between tokens beyond the request's own: long prefills are normal.
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0), transport=transport)
        self._health_interval = health_interval_s
        self._health_task: asyncio.Task | None = None
        # Probe even while every upstream looks up: a router must learn that a tier is
        # down before a turn is sent there, not from the turn's failure.
        self._probe_always = False

    @classmethod
    def load(cls, profile: Any, checkpoint: Any, upstreams: list[str], api_key: str | None = None) -> RemoteEngine:
        """Blocking (tokenizer, one model listing): call it in a thread. The context
        length is the upstreams' own when one answers, else the profile's."""
        from transformers import AutoTokenizer

        model = profile.upstream_model or profile.name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        max_len = profile.context_length
        for url in upstreams:
            try:
                listed = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=5.0).json()["data"]
                max_len = next(m.get("max_model_len") or max_len for m in listed if m["id"] == model)
                break
            except (httpx.HTTPError, ValueError, KeyError, StopIteration):
                continue  # down for now: the health checks will find it
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        return cls(upstreams, model, profile.name, tokenizer, max_len, api_key=api_key)

    # ------------------------------------------------------------ tokenizer (local)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tokenizer.encode(text, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------ choosing an upstream

    def _pick(self, tried: set[str]) -> Upstream:
        candidates = [u for u in self.upstreams if u.url not in tried and u.healthy]
        if not candidates:
            down = sum(not u.healthy for u in self.upstreams)
            raise ServiceUnavailableError(
                f"no model server is available right now ({down} of {len(self.upstreams)} down); retry shortly", code="upstream_unavailable"
            )
        # Least outstanding requests; ties go to the first listed (stable for tests and caches).
        return min(candidates, key=lambda u: u.outstanding)

    def _mark_down(self, upstream: Upstream, why: str) -> None:
        if upstream.healthy:
            log.warning("model server %s is down: %s", upstream.url, why)
        upstream.healthy = False
        self._ensure_health_checks()

    def available(self) -> bool:
        return any(u.healthy for u in self.upstreams)

    def watch_health(self) -> None:
        """Probe every upstream periodically from now on (call it on the event loop)."""
        self._probe_always = True
        self._ensure_health_checks()

    def _ensure_health_checks(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._check_health_forever())

    async def _check_health_forever(self) -> None:
        while self._probe_always or any(not u.healthy for u in self.upstreams):
            await asyncio.sleep(self._health_interval)
            await self.check_health()

    async def check_health(self) -> None:
        """Probe every upstream's /health (vLLM's: 200 once its engine is up)."""

        async def probe(u: Upstream) -> None:
            try:
                r = await self._client.get(u.url.removesuffix("/v1") + "/health", headers=self._headers, timeout=2.0)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and not u.healthy:
                log.info("model server %s is back", u.url)
            u.healthy = ok

        await asyncio.gather(*(probe(u) for u in self.upstreams))

    # ------------------------------------------------------------ generation

    def _body(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "prompt": list(prompt_token_ids),
            "stream": True,
            "return_token_ids": True,
            "request_id": request_id,
            "n": params.n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "min_p": params.min_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty,
            "min_tokens": params.min_tokens,
            "ignore_eos": params.ignore_eos,
            "stop": list(params.stop),
            # The template's special tokens are already in the prompt ids.
            "add_special_tokens": False,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs is not None:
            body["logprobs"] = max(params.logprobs, 1)
        if params.bad_words:
            body["bad_words"] = list(params.bad_words)
        if params.regex is not None:
            body["structured_outputs"] = {"regex": params.regex}
        elif params.json_schema is not None:
            body["structured_outputs"] = {"regex": response_format_regex(params.json_schema)}
        return body

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        body = self._body(request_id, prompt_token_ids, params)
        tried: set[str] = set()
        while True:
            upstream = self._pick(tried)
            tried.add(upstream.url)
            started = False
            upstream.outstanding += 1
            try:
                async with self._client.stream("POST", upstream.url + "/completions", json=body, headers=self._headers) as resp:
                    if resp.status_code >= 500:
                        raise _Retryable(f"HTTP {resp.status_code}")
                    if resp.status_code >= 400:
                        raise _client_error(resp.status_code, await resp.aread())
                    upstream.streams[request_id] = resp
                    async for line in resp.aiter_lines():
                        for chunk in _chunks(line, params.logprobs):
                            started = True
                            yield chunk
                return
            except (httpx.TransportError, _Retryable) as exc:
                if started:
                    log.error("model server %s failed mid-stream on %s: %s", upstream.url, request_id, exc)
                    raise EngineError("the model server failed while generating") from None
                self._mark_down(upstream, str(exc) or type(exc).__name__)
            finally:
                upstream.outstanding -= 1
                upstream.streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        for u in self.upstreams:
            resp = u.streams.pop(request_id, None)
            if resp is not None:
                await resp.aclose()  # vLLM aborts a request whose client disconnected

    def num_unfinished_requests(self) -> int:
        return sum(u.outstanding for u in self.upstreams)

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self._client.aclose()


def _client_error(status: int, raw: bytes) -> InvalidRequestError:
    try:
        detail = json.loads(raw)
        message = detail.get("error", {}).get("message") or detail.get("message") or raw.decode()[:300]
    except (ValueError, AttributeError):
        message = raw.decode(errors="replace")[:300]
    return InvalidRequestError(f"the model server refused the request: {message}", status_code=400 if status != 413 else 413)


def _chunks(line: str, k: int | None) -> list[GenerationChunk]:
    """The GenerationChunks of one server-sent event line of a completions stream."""
    if not line.startswith("data:"):
        return []
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return []
    event = json.loads(data)
    if "error" in event:
        raise EngineError(f"the model server failed: {event['error'].get('message', 'unknown error')}")
    out = []
    for choice in event.get("choices") or []:
        token_ids = choice.get("token_ids") or []
        out.append(
            GenerationChunk(
                index=choice.get("index", 0),
                text=choice.get("text") or "",
                token_ids=token_ids,
                finish_reason=choice.get("finish_reason"),
                stop_reason=choice.get("stop_reason"),
                logprobs=_logprobs(choice.get("logprobs"), k) if k is not None else None,
            )
        )
    return out


def _logprobs(entry: dict[str, Any] | None, k: int) -> list[TokenLogprob]:
    if not entry:
        return []
    tops = entry.get("top_logprobs") or []
    result = []
    for i, token in enumerate(entry.get("tokens") or []):
        alternatives = sorted((tops[i] or {}).items(), key=lambda kv: -kv[1])[:k] if i < len(tops) else []
        lp = entry["token_logprobs"][i]
        result.append(TokenLogprob(token=token, logprob=max(lp if lp is not None else -9999.0, -9999.0), top=tuple((t, max(v, -9999.0)) for t, v in alternatives)))
    return result
