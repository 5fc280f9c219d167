"""create_app(settings): routers, error handlers, and the lifespan that loads the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy.engine import Engine as Database
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.agents.config import AgentConfig, load_agents
from server.agents.director import AgentDirector
from server.agents.handoff import HandoffDecider
from server.auth import KeyStore, authorize
from server.batches.priority import InteractiveTraffic, InteractiveTrafficMiddleware
from server.batches.store import BatchStore
from server.batches.worker import BatchWorker
from server.checkpoints import verify
from server.config import Settings
from server.console import pages as console_pages
from server.console import session as console_session
from server.db import connect
from server.deployments import load_deployment
from server.embedder import Embedder, packaged_model_dir
from server.engine.base import Engine
from server.engine.kinds import EngineSpec, load_engine
from server.engine.metered import MeteredEngine
from server.errors import (
    ConfigError,
    EnclaveError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from server.forgetting import Forgetter
from server.guard import Guard, GuardAudit
from server.handles import Late
from server.mcp.tools import add_mcp_servers
from server.memory.context import MemoryServices
from server.memory.conversations import ConversationStore
from server.memory.episodic import EpisodicMemory
from server.memory.ingestion import IngestWorker, lease_owner
from server.memory.knowledge import KnowledgeBase
from server.memory.parsing import Limits
from server.memory.response_cache import ResponseCache
from server.memory.store_migration import move_legacy_chunks
from server.memory.vectors import ChromaCollections
from server.middleware import (
    BodyLimitMiddleware,
    DeadlineMiddleware,
    RequestMetricsMiddleware,
)
from server.model_registry import ModelRegistry
from server.profiles import ModelProfile, find_profile
from server.routes import (
    actions,
    batches,
    chat,
    docs,
    embeddings,
    files,
    guardrails,
    health,
    memory,
    models,
    responses,
    traces,
    usage,
    vector_stores,
)
from server.routing import ModelRouter, with_examples
from server.scopes import route_scope
from server.telemetry.cost import DEFAULT_SECONDS_PER_TOKEN, Accounting, EngineClock
from server.telemetry.metrics import Metrics
from server.telemetry.tracing import Tracing
from server.toolcalls.executor import Executor
from server.toolcalls.precompile import precompile
from server.toolcalls.registry import Registry
from server.toolcalls.shortlist import Shortlister, ShortlistPolicy
from server.turn.pipeline import ChatServing
from server.turn.source_answer import source_answers_on
from server.workflows.config import load_workflows
from server.workflows.runner import WorkflowDirector
from server.workflows.store import WorkflowStore

log = logging.getLogger("enclave")


class Runtime:
    """What the routes reach through app.state.runtime; filled in as loading finishes."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        keys: KeyStore,
        executor: Executor | None = None,
        memory: MemoryServices | None = None,
        guard: Guard | None = None,
        tracing: Tracing | None = None,
        db: Database | None = None,
        embedder: Late[Embedder] | None = None,
        engine: Late[Engine] | None = None,
    ):
        self.settings = settings
        # The models that load after start-up, shared with the services that use them.
        self.embedder_handle: Late[Embedder] = embedder or Late()
        self.engine_handle: Late[Engine] = engine or Late()
        self.tracing = tracing
        self.db = db
        self.accounting: Accounting | None = None
        self.metrics = metrics
        self.keys = keys
        self.executor = executor
        self.memory = memory
        self.guard = guard
        # One for every model's serving: the tools' embeddings are kept across turns.
        shortlist = ShortlistPolicy(size=settings.tool_shortlist)
        if not settings.tool_auto_decision:
            shortlist = dataclasses.replace(shortlist, call_at=None)
        self.shortlister = Shortlister(self.embedder_handle, shortlist) if settings.tool_shortlist > 0 else None
        self.started = int(time.time())
        self.profile: ModelProfile | None = None
        self.checkpoint: Path | None = None
        self.chat: ChatServing | None = None
        self.load_error: str | None = None
        self._engine: Engine | None = None
        # The other models routing needs (its tiers beyond `profile`), and every model's
        # serving by profile name once loaded.
        self.tier_profiles: list[tuple[ModelProfile, Path]] = []
        self.models = ModelRegistry(settings.embedding_model_name, self.started)
        self.forgetter = Forgetter(db, memory.episodic, tracing, memory.cache) if memory is not None and db is not None else None
        self.ingest: IngestWorker | None = None
        self.agents: AgentDirector | None = None  # the deployment's agents, when it declares any
        self.workflows: WorkflowDirector | None = None  # and its workflows
        self._warming: asyncio.Task | None = None  # precompiling after an engine restart
        self.guard_audit: GuardAudit | None = None
        self.traffic = InteractiveTraffic()  # what the batch worker gives way to
        self.batch_store: BatchStore | None = None
        self.batch_worker: BatchWorker | None = None

    @property
    def embedder(self) -> Embedder | None:
        return self.embedder_handle.value

    @property
    def served_names(self) -> list[str]:
        if self.profile is not None:
            return self.profile.served_names
        return [self._engine.served_model] if self._engine else []

    @property
    def servings(self) -> dict[str, ChatServing]:
        return self.models.servings

    @property
    def router(self) -> ModelRouter | None:
        return self.models.router

    def select(self, model: str) -> ChatServing:
        """The serving a request names by model name or alias: the primary one when none
        does, which then answers with the right error (unknown or embedding model)."""
        primary = self.require_chat()
        return self.models.serving_for(model) or primary

    @property
    def embedding_name(self) -> str:
        return self.settings.embedding_model_name

    @property
    def ready(self) -> bool:
        return self.chat is not None and self.embedder is not None and self.engine_state == "serving"

    @property
    def engine_state(self) -> str:
        """"serving", or the worst state of a supervised engine ("restarting", "failed")."""
        states = {s.engine.state for s in self.servings.values()}
        return "failed" if "failed" in states else "restarting" if "restarting" in states else "serving"

    def attach(self, engine: Engine, embedder: Embedder | None, others: list[tuple[ModelProfile, Engine]] | None = None) -> None:
        primary = self._serving(self.profile, engine, self.served_names, self.settings.cost_per_hour)
        engine = primary.engine
        self.accounting = primary.accounting
        self._engine = engine
        self.embedder_handle.set(embedder)
        self.engine_handle.set(engine)  # rails that call a model (self-check) use the primary one
        servings = [primary, *(self._serving(profile, other, profile.served_names, None) for profile, other in others or [])]
        for serving in servings:
            self.models.add(serving)
        if self.settings.routing is not None:
            self.models.router = ModelRouter(self.settings.routing, self.servings, embedder, self.db)  # type: ignore[arg-type]
            for serving in servings:
                serving.engine.watch_health()

        def generations() -> int:
            return sum(s.engine.num_unfinished_requests() for s in servings)

        self.metrics.watch_engine(generations, engine.scheduler_counts)
        for serving in servings:
            serving.engine.start()  # a supervised engine's watcher
        self.chat = primary
        if self.memory is not None and embedder is not None:
            self.ingest = self._ingest_worker(embedder, generations)
            self.memory.knowledge.ingest = self.ingest
            self.ingest.start()
        self.metrics.ready.set_function(lambda: 1 if self.ready else 0)

    def _ingest_worker(self, embedder: Embedder, chats_running: Callable[[], int]) -> IngestWorker:
        s = self.settings
        assert self.memory is not None and self.db is not None
        worker = IngestWorker(
            self.db,
            self.memory.knowledge,
            embedder,
            s.embedding_model_path or packaged_model_dir(),
            Limits(s.ingest_max_pages, s.ingest_max_characters, s.ingest_max_chunks),
            s.ingest_timeout_s,
            s.ingest_workers,
            s.ingest_share,
            chats_running,
            owner=lease_owner(socket.gethostname(), s.port, s.data_dir.resolve()),
            metrics=self.metrics,
        )
        return worker

    def _serving(self, profile: ModelProfile | None, engine: Engine, served_names: list[str], price_override: float | None) -> ChatServing:
        """One model's serving: every generation on it (turns, summaries, self-checks) is
        timed, traced and charged at its price (ENCLAVE_COST_PER_HOUR overrides only the
        served model's, as ENCLAVE_UPSTREAMS does its upstreams)."""
        clock = EngineClock()
        metered = MeteredEngine(engine, clock)
        accounting = None
        if self.db is not None:
            price = price_override if price_override is not None else (profile.cost_per_hour if profile else 0.0)
            pace = profile.seconds_per_token if profile else DEFAULT_SECONDS_PER_TOKEN
            accounting = Accounting(self.db, price, pace)
        self.metrics.watch_clock(metered.served_model, lambda: clock.busy_seconds)
        return ChatServing(
            metered,  # type: ignore[arg-type]
            self.metrics,
            served_names or [engine.served_model],
            self.embedding_name,
            self.executor,
            self.settings.max_tool_steps,
            self.memory,
            self.guard,
            self.tracing,
            accounting,
            self.shortlister,
            self.settings.tool_grounding,
            (self.embedder_handle, self.settings.source_answer_policy) if source_answers_on(self.settings.source_answers, profile and profile.tier) else None,
        )

    def agent_serving(self, agent: AgentConfig) -> ChatServing:
        """The serving an agent runs on: its routing tier's, its model's, else the served model's."""
        primary = self.require_chat()
        if agent.tier is not None and self.router is not None:
            return self.router.serving(agent.tier)  # type: ignore[return-value]
        if agent.model is not None:
            serving = self.models.serving_for(agent.model)
            if serving is None:
                raise ServiceUnavailableError(f"the model {agent.model!r} of agent {agent.name} is not served here")
            return serving
        return primary

    def require_chat(self) -> ChatServing:
        if self.chat is None:
            raise ServiceUnavailableError(self.load_error or "the model is still loading; retry shortly")
        return self.chat

    def require_executor(self) -> Executor:
        if self.executor is None:
            raise ServiceUnavailableError("server-side tools are not enabled on this server")
        return self.executor

    def require_memory(self) -> MemoryServices:
        if self.memory is None:
            raise ServiceUnavailableError("conversations, memory and knowledge are not enabled on this server")
        return self.memory

    def require_batches(self) -> tuple[BatchStore, BatchWorker]:
        if self.batch_store is None or self.batch_worker is None:
            raise ServiceUnavailableError("batches need the server's files store (memory services), which is not enabled")
        return self.batch_store, self.batch_worker

    def start_batches(self, app: FastAPI) -> None:
        """The batch worker sends lines through `app` itself; it waits for the models."""
        if self.memory is None or self.db is None:
            return
        s = self.settings
        self.batch_store = BatchStore(self.db, self.memory.knowledge)
        owner = "batch-" + lease_owner(socket.gethostname(), s.port, s.data_dir.resolve()).removeprefix("ingest-")
        self.batch_worker = BatchWorker(self.batch_store, app, self.keys, self.traffic, s.batch_concurrency, lambda: self.ready, owner)
        self.batch_worker.start()

    def require_forgetter(self) -> Forgetter:
        self.require_memory()
        assert self.forgetter is not None
        return self.forgetter

    def require_embedder(self) -> Embedder:
        if self.embedder is None:
            raise ServiceUnavailableError(self.load_error or "the embedding model is still loading; retry shortly")
        return self.embedder

    async def load(self) -> None:
        """Load the embedder and the engine in a worker thread, so /health answers meanwhile.

        One thread, one model after the other: importing transformers from two threads at
        once races inside its lazy module loader. A failure stops the server (the process
        exits non-zero) rather than leaving it up and useless.
        """
        try:
            embedder, engine, others = await asyncio.to_thread(self._load_blocking)
            self.embedder_handle.set(embedder)
            self.engine_handle.set(engine)
            if self.guard is not None:
                await self.guard.warm_up()
            await self._precompile(engine)
        except Exception as exc:  # any failure here means the server cannot serve
            self.load_error = f"loading failed: {exc}"
            log.exception("loading the models failed; shutting down")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.attach(engine, embedder, others)
        # Everything loaded so far lives as long as the process: move it out of the
        # collector's view, so full collections while serving stay short (vLLM does the same).
        gc.collect()
        gc.freeze()
        log.info("ready: serving %s (max_model_len %d) and %s", engine.served_model, engine.max_model_len, embedder.name)

    def _load_blocking(self) -> tuple[Embedder, Engine, list[tuple[ModelProfile, Engine]]]:
        assert self.profile is not None and self.checkpoint is not None
        settings = self.settings
        embedder = Embedder(settings.embedding_model_path or packaged_model_dir(), settings.embedding_model_name)
        # ENCLAVE_UPSTREAMS and ENCLAVE_ENGINE_OVERRIDES are the served model's; the
        # other tiers come as their profiles say.
        engine = self._load_engine(self.profile, self.checkpoint, settings.upstreams, settings.engine_overrides)
        others = [(profile, self._load_engine(profile, checkpoint, [], {})) for profile, checkpoint in self.tier_profiles]
        return embedder, engine, others

    def _load_engine(self, profile: ModelProfile, checkpoint: Path, upstreams: list[str], overrides: dict) -> Engine:
        def restarted(engine: Engine) -> None:
            self.metrics.engine_restarts.labels(model=profile.name).inc()
            # The tool packs' constraints again, before users need them (cheap: xgrammar
            # compiles in milliseconds, outlines reads its on-disk cache).
            self._warming = asyncio.get_running_loop().create_task(self._precompile(engine))

        spec = EngineSpec(profile, checkpoint, self.settings, self.metrics, upstreams or profile.upstreams, overrides, self._give_up, restarted)
        return load_engine(spec)

    async def _precompile(self, engine: Engine) -> None:
        if self.executor is not None:
            await precompile(engine, self.executor.registry)

    def _give_up(self, why: str) -> None:
        """An engine cannot be kept alive: stop the server with a non-zero exit (cli.py),
        so the process supervisor restarts or replaces it."""
        self.load_error = why
        os.kill(os.getpid(), signal.SIGTERM)

    async def close(self) -> None:
        if self.batch_worker is not None:
            await self.batch_worker.close()
        if self.ingest is not None:
            await self.ingest.close()
        for serving in self.servings.values():
            await serving.engine.shutdown()
        await self.executor.registry.close()  # MCP servers' connections (stdio children stop)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the spans still batched


def _error_json(exc: EnclaveError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)


def _validation_error(exc: RequestValidationError) -> EnclaveError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request. Send valid JSON.", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
        code = "missing_required_parameter"
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
        code = "invalid_value"
    return InvalidRequestError(message, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    # The console's pages answer errors as pages (or the sign-in page), the API as JSON.
    @app.exception_handler(EnclaveError)
    async def _enclave(request: Request, exc: EnclaveError) -> Response:
        if console_session.is_console(request.url.path):
            return console_pages.error_page(request, exc)
        return _error_json(exc, exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        if console_session.is_console(request.url.path):
            return console_pages.error_page(request, _validation_error(exc))
        return _error_json(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error: EnclaveError = NotFoundError(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        else:
            error = InvalidRequestError(str(exc.detail), status_code=exc.status_code, code="http_error")
        return _error_json(error, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback here; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_json(EnclaveError("The server had an error while processing your request."))


def build_memory(settings: Settings, db: Database, embedder: Late[Embedder], guard: Guard | None, metrics: Metrics) -> MemoryServices:
    """Conversations (SQL) and vectors (Chroma) open before binding, like the database:
    an unreachable Chroma server stops start-up with the setting to fix."""
    vectors = ChromaCollections.open(settings.data_dir, settings.chroma_url, settings.chroma_token)
    knowledge = KnowledgeBase(db, vectors, embedder, settings.data_dir / "files")
    move_legacy_chunks(db, vectors, knowledge.store_chunks)  # stores made before each had its own collection
    return MemoryServices(
        ConversationStore(db),
        EpisodicMemory(db, vectors, embedder, settings.memory_recall_k),
        knowledge,
        output_reserve=settings.context_output_reserve,
        summary_tokens=settings.summary_tokens,
        guard=guard,
        metrics=metrics,
        cache=ResponseCache(db, vectors, embedder, settings.response_cache) if settings.response_cache.mode != "off" else None,
    )


def tier_profiles(settings: Settings, primary: ModelProfile) -> list[tuple[ModelProfile, Path]]:
    """The profiles and verified checkpoints of the routing tiers beyond the served model:
    a missing one stops start-up, like the served model's own."""
    if settings.routing is None:
        return []
    out: list[tuple[ModelProfile, Path]] = []
    for model in dict.fromkeys(settings.routing.tiers.values()):
        profile = find_profile(settings.profiles_dir, model)
        if profile.name != model:
            raise ConfigError(f"routing tier model {model!r} must be a profile's name (it is an alias of {profile.name})")
        if profile.name != primary.name:
            out.append((profile, verify(profile, settings.models_dir)))
    if primary.name not in settings.routing.tiers.values():
        log.info("routing: the served model %s is in no tier; it is still served by its name", primary.name)
    return out


def check_agent_models(agents: dict[str, AgentConfig], settings: Settings, profile: ModelProfile | None) -> None:
    """Each agent's tier is a routing tier, its model one this server loads."""
    routing = settings.routing
    served = set(profile.served_names) if profile is not None else set()
    served |= set(routing.tiers.values()) if routing is not None else set()
    for agent in agents.values():
        if agent.tier is not None and (routing is None or agent.tier not in routing.tiers):
            tiers = ", ".join(routing.tiers) if routing is not None else "none: routing is not configured"
            raise ConfigError(f"agent {agent.name}: tier {agent.tier!r} is not a routing tier (tiers: {tiers})")
        if agent.model is not None and profile is not None and agent.model not in served:
            raise ConfigError(f"agent {agent.name}: model {agent.model!r} is not served here (served: {', '.join(sorted(served))})")


def check_route_scopes(app: FastAPI) -> None:
    """Refuse to start with a route that has no line in server.scopes.ROUTE_SCOPES, or
    that would not pass `authorize` at all."""
    missing = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            missing.append(f"{type(route).__name__} {getattr(route, 'path', route)}")
            continue
        missing += [f"{method} {route.path}" for method in sorted(route.methods) if route_scope(method, route.path) is None]
    if missing:
        raise ConfigError(f"routes without a scope in server/scopes.py: {', '.join(missing)}")


def create_app(
    settings: Settings, *, engine: Engine | None = None, embedder: Embedder | None = None, others: list[tuple[ModelProfile, Engine]] | None = None
) -> FastAPI:
    """Build the app. Without `engine`, the profile's checkpoint is verified now (a missing
    or corrupt model fails here, before binding) and loaded in the background."""
    metrics = Metrics()
    # Tool packs and the database open before binding: a bad pack name or database URL
    # stops start-up with a message instead of failing the first request.
    db = connect(settings.resolved_database_url)
    registry = Registry.load(settings.tool_packs, settings)
    add_mcp_servers(registry, settings.mcp_servers)
    deployment = load_deployment(settings.deployments_dir, settings.deployment)
    if settings.routing is not None:
        try:
            settings.routing = with_examples(settings.routing, deployment.routing_examples)
        except ValueError as exc:
            raise ConfigError(f"routing (deployment {deployment.name}): {exc}") from None
    # The services, built once and complete; the models they use arrive through handles.
    embedder_handle: Late[Embedder] = Late(embedder)
    engine_handle: Late[Engine] = Late()
    guard = None
    guard_audit = GuardAudit(db)  # the rails' audit log: written by the guard, read by the API
    if settings.rails:
        # Loaded and validated before binding: a broken rails/ stops start-up here.
        rails_dirs = [settings.rails_dir] + ([deployment.rails_dir] if deployment.rails_dir else [])
        guard = Guard(
            rails_dirs,
            metrics,
            settings.rails_canary,
            audit=guard_audit,
            embedder=embedder_handle,
            engine=engine_handle,
            compiled=settings.rails_compiled,
        )
    executor = Executor(registry, db, settings.action_ttl_s, guard=guard, metrics=metrics)
    memory_services = build_memory(settings, db, embedder_handle, guard, metrics)
    otlp = settings.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None
    tracing = Tracing(db, otlp, settings.trace_retention_days)
    runtime = Runtime(settings, metrics, KeyStore(settings.resolved_keys_file), executor, memory_services, guard, tracing, db, embedder_handle, engine_handle)
    runtime.guard_audit = guard_audit
    if engine is None:
        runtime.profile = find_profile(settings.profiles_dir, settings.model)
        runtime.models.expected = (runtime.profile.served_names, runtime.profile.context_length)
        runtime.checkpoint = verify(runtime.profile, settings.models_dir)
        runtime.tier_profiles = tier_profiles(settings, runtime.profile)
    workflows = load_workflows(deployment.path)
    agents = load_agents(deployment.path)
    if workflows:
        runtime.workflows = WorkflowDirector(workflows, WorkflowStore(db), executor)
        runtime.workflows.check(agents)
        runtime.models.workflows = workflows
    if agents:
        check_agent_models(agents, settings, runtime.profile)
        decider = HandoffDecider(agents, runtime.shortlister or Shortlister(embedder_handle, ShortlistPolicy()), workflows)
        conversations = memory_services.conversations if memory_services else None
        runtime.agents = AgentDirector(agents, decider, registry, conversations, runtime.workflows)
        runtime.agents.check_tools()
        runtime.agents.check_workflows()
        runtime.models.agents = agents

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start_batches(app)
        loader = None
        if engine is not None:
            runtime.attach(engine, embedder, others)
        else:
            loader = asyncio.create_task(runtime.load())
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            await runtime.close()

    # Every route passes `authorize` (its scope from server.scopes); FastAPI's own docs
    # routes would not, so they are served by routes/docs.py instead.
    app = FastAPI(
        title="Enclave", version="0.1.0", lifespan=lifespan, dependencies=[Depends(authorize)], openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.runtime = runtime
    app.state.keys = runtime.keys
    app.state.settings = settings
    install_error_handlers(app)
    for router in (
        health.router,
        docs.router,
        models.router,
        chat.router,
        responses.router,
        embeddings.router,
        files.router,
        vector_stores.router,
        memory.router,
        actions.router,
        batches.router,
        traces.router,
        guardrails.router,
        usage.router,
        console_pages.router,
    ):
        app.include_router(router)
    check_route_scopes(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(DeadlineMiddleware, timeout_s=settings.request_timeout_s, stall_s=settings.stall_timeout_s)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(InteractiveTrafficMiddleware, traffic=runtime.traffic)
    return app
