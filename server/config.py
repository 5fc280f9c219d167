"""The one typed Settings object: defaults < YAML file < ENCLAVE_* variables < CLI flags."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from server.deployments import NAME as DEPLOYMENT_NAME
from server.deployments import load_deployment
from server.errors import ConfigError
from server.mcp.config import MCPServerConfig
from server.routing import RoutingConfig

# The repository's own models/ directory: profiles ship with the code.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ResponseCacheConfig(BaseModel):
    """`response_cache:` in the settings (or ENCLAVE_RESPONSE_CACHE as JSON)."""

    model_config = ConfigDict(extra="forbid")

    # off: never; opt_in: only requests that ask (`"cache": true`); on: every eligible
    # request unless it says `"cache": false`.
    mode: Literal["off", "opt_in", "on"] = "off"
    # Cosine similarity a question must reach to be answered from a different question's
    # entry; 1.0 turns semantic matching off (exact matches only).
    similarity: float = Field(0.95, gt=0.0, le=1.0)
    ttl_s: float = Field(24 * 3600.0, gt=0)


class SourceAnswerPolicy(BaseModel):
    """How an answer is chosen from the turn's evidence (server/turn/source_answer.py);
    the defaults were chosen on the development questions (scripts/tune_source_answers.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: int = Field(3, ge=1, le=9)  # best-ranked sentences the model chooses among
    min_similarity: float = Field(0.40, ge=-1.0, le=1.0)  # the best sentence's cosine to the question, at least
    model_weight: float = Field(0.0, ge=0.0)  # added to a candidate's cosine: weight x the model's P(it); 0: no model step


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # All state (keys, later conversations, vectors) lives here; tests throw it away.
    data_dir: Path = Path("data")
    # Prepared checkpoints live apart from the data so a fresh data dir costs no re-prepare.
    models_dir: Path = Path("~/.cache/enclave/models")
    profiles_dir: Path = PROJECT_ROOT / "models"
    # What the server is for (server/deployments.py): "general" (a general assistant) or
    # "support" (the customer-support desk), or an operator's own directory beside them.
    # Its settings are defaults under every other source.
    deployment: str = Field("general", pattern=f"^{DEPLOYMENT_NAME.pattern}$")
    deployments_dir: Path = PROJECT_ROOT / "deployments"
    model: str = "smollm2-135m-instruct"
    # Directory of a sentence-transformers model; empty means the packaged all-MiniLM-L6-v2.
    embedding_model_path: Path | None = None
    embedding_model_name: str = "all-MiniLM-L6-v2"
    max_embedding_inputs: int = Field(2048, ge=1)
    # Defaults to <data_dir>/keys.json; no file (or an empty one) means auth is off.
    keys_file: Path | None = None
    # Allow binding beyond loopback without API keys (the operator takes the risk).
    insecure: bool = False
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    # Server-side deadline of every request (clients may ask for less with the
    # X-Enclave-Timeout header), and the longest the engine may go without producing any
    # output, for any request, before waiting generations are stopped (a hung engine, not
    # a busy one; server/deadlines.py): both end in a 504.
    request_timeout_s: float = Field(600.0, gt=0)
    stall_timeout_s: float = Field(120.0, gt=0)
    # /openapi.json, /docs and /redoc need a key like every other route unless this opens them.
    public_docs: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # vLLM OpenAI servers to generate on instead of an in-process engine (JSON list of base
    # URLs ending in /v1); overrides the profile's `upstreams`.
    upstreams: list[str] = Field(default_factory=list)
    upstream_api_key: str | None = None
    # Model aliases routed to tiers of models by policy (server/routing.py); every tier's
    # model profile is loaded beside `model`. Empty: no routing, requests name a model.
    routing: RoutingConfig | None = None
    # Extra engine arguments that override the profile's (e.g. {"max_num_seqs": 32}).
    engine_overrides: dict[str, Any] = Field(default_factory=dict)
    # SQLAlchemy URL of the relational state; empty means <data_dir>/enclave.db (SQLite).
    database_url: str | None = None
    # Server-side tool packs (modules under tools/) enabled; the deployment names its own.
    tool_packs: list[str] = Field(default_factory=list)
    # Per-pack options, e.g. {"support": {"refund_limit": 200}}; each pack documents its own.
    tool_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Where tool packs keep each tenant's database (<dir>/<pack>/…); empty: <data_dir>/packs.
    pack_data_dir: Path | None = None
    # MCP servers whose tools are server tools (server/mcp): each a label, `command`
    # (stdio) or `url` (streamable HTTP), the tools allowed and those to confirm.
    mcp_servers: list[MCPServerConfig] = Field(default_factory=list)
    # Per-tool rate limits per API key that override the packs' own, e.g. {"create_refund": "10/hour"}.
    tool_rate_limits: dict[str, str] = Field(default_factory=dict)
    # On-disk cache of compiled output constraints (vLLM's outlines cache, under
    # <data_dir>/cache/outlines), kept across restarts; emptied at start-up when it has
    # grown past this many MB. 0: no disk cache (compiles are kept in memory only).
    constraint_cache_mb: int = Field(1024, ge=0)
    # Model → tool → observation rounds per turn before the model must answer.
    max_tool_steps: int = Field(5, ge=1, le=20)
    # Tools offered to the model per turn (`auto`/`required`), ranked against the user's
    # message by the embedding model (server/toolcalls/shortlist.py); 0 offers every tool.
    tool_shortlist: int = Field(2, ge=0, le=64)
    # Identifiers, numbers and enum members of tool arguments constrained to the values
    # written in the conversation, where some fit (server/toolcalls/grounding.py).
    tool_grounding: bool = True
    # Under `tool_choice: auto`, a request the shortlist's ranking clearly matches to a tool
    # calls it (the first step as under `required`); off: the model decides alone.
    tool_auto_decision: bool = True
    # Answers built from the turn's evidence: a sentence of its knowledge sources, cited,
    # or the user's own earlier words (server/turn/source_answer.py). "auto": for models of
    # the `small` tier; "off": the model always answers in its own words.
    source_answers: Literal["auto", "on", "off"] = "auto"
    source_answer_policy: SourceAnswerPolicy = Field(default_factory=lambda: SourceAnswerPolicy())
    # How long a destructive action waits for confirmation before it expires.
    action_ttl_s: float = Field(900.0, gt=0)
    # Chroma server (http://host:port) shared by replicas; empty: embedded, in <data_dir>/chroma.
    chroma_url: str | None = None
    # Sent as `Authorization: Bearer …` on every request to that server, for the proxy or
    # gateway that guards it (Chroma's own 1.x server checks no credentials).
    chroma_token: str | None = Field(None, min_length=1)
    # Tokens kept free for the answer when a stateful request names no maximum.
    context_output_reserve: int = Field(512, ge=16)
    # Length cap of the running summary of older turns.
    summary_tokens: int = Field(160, ge=32, le=2048)
    # Guardrails: the base NeMo Guardrails configuration directory, run around every turn
    # with the deployment's own rails on top of it.
    rails: bool = True
    rails_dir: Path = PROJECT_ROOT / "rails"
    # Run each stage's flows as a compiled plan of their actions (server/rail_plan.py);
    # false: every check through NeMo's Colang runtime (the same decisions, slower).
    rails_compiled: bool = True
    # The system-prompt canary the leak rail looks for; empty: a new random one per
    # process ("enc" and three common words, server/canary.py). Pin a secret one where
    # answers must be the same across restarts (evals); every token of it is prefill on
    # every turn, so whole words are cheaper than hex.
    rails_canary: str | None = Field(None, min_length=6, max_length=48, pattern=r"^[A-Za-z0-9-]+( [A-Za-z0-9-]+)*$")
    # Indexing of vector-store files (server/memory/ingestion.py): files indexed at once by
    # this server, and each file's limits; a file over one fails with a last_error naming it.
    ingest_workers: int = Field(2, ge=1, le=16)
    ingest_max_pages: int = Field(2000, ge=1)
    ingest_max_characters: int = Field(10_000_000, ge=1)
    ingest_max_chunks: int = Field(20_000, ge=1)
    ingest_timeout_s: float = Field(3600.0, gt=0)
    # While chats are running, indexing takes at most this share of the embedder's time.
    ingest_share: float = Field(0.5, gt=0, le=1)
    # Where `enclave eval` writes its reports (its --out default); the console lists them.
    eval_reports_dir: Path = Path("evals/reports")
    # Batches (server/batches): lines run at once while no interactive request is in
    # flight (none start while one is), and the most lines one input file may hold.
    batch_concurrency: int = Field(4, ge=1, le=64)
    batch_max_lines: int = Field(50_000, ge=1)
    # Memories recalled into a turn.
    memory_recall_k: int = Field(4, ge=0, le=32)
    # Answers kept and given again for repeated questions (server/memory/response_cache.py).
    response_cache: ResponseCacheConfig = Field(default_factory=ResponseCacheConfig)
    # Traces are always kept in SQL; with an OTLP/HTTP endpoint (e.g.
    # http://collector:4318/v1/traces) they are exported there too. Empty: the standard
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variable, if set.
    otlp_endpoint: str | None = None
    # Days the local trace store keeps spans (0: for ever).
    trace_retention_days: float = Field(30.0, ge=0)
    # Hourly hardware cost (USD) for cost accounting; empty: the model profile's.
    cost_per_hour: float | None = Field(None, ge=0)

    @field_validator("data_dir", "models_dir", "profiles_dir", "deployments_dir", "keys_file", "embedding_model_path", "pack_data_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def resolved_keys_file(self) -> Path:
        return self.keys_file or self.data_dir / "keys.json"

    @property
    def resolved_pack_data_dir(self) -> Path:
        return self.pack_data_dir or self.data_dir / "packs"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'enclave.db'}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def _chosen(name: str, overrides: dict[str, Any], file_data: dict[str, Any]) -> Any:
    """A setting's value from the sources above the deployment's, before validation."""
    for value in (overrides.get(name), os.environ.get(f"ENCLAVE_{name.upper()}"), file_data.get(name)):
        if value is not None:
            return value
    return Settings.model_fields[name].default


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings; a wrong value raises ConfigError naming the key to fix.

    Sources, lowest first: the defaults, the deployment's settings, the YAML file, the
    ENCLAVE_* variables, then `overrides` (the CLI's flags)."""
    file_data = _read_yaml(config_file) if config_file else {}
    name = str(_chosen("deployment", overrides, file_data))
    deployment = load_deployment(Path(str(_chosen("deployments_dir", overrides, file_data))).expanduser(), name)

    class _Settings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            return (init_settings, env_settings, _YamlSource(settings_cls, file_data), _YamlSource(settings_cls, deployment.settings))

    try:
        values = _Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'} "
            f"(ENCLAVE_{str(err['loc'][0]).upper() if err['loc'] else ''}): {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
    # Field by field, not model_dump(): nested settings (routing) stay validated models.
    return Settings.model_construct(**{name: getattr(values, name) for name in Settings.model_fields})
