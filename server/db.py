"""Relational state (SQLAlchemy Core): conversations, knowledge files, pending actions,
the tool audit log and the response cache.

SQLite file by default, any SQLAlchemy URL (PostgreSQL) by setting. Nothing that must
survive a restart or be shared by replicas lives in process memory: rate limits are
counted from the audit log and confirmations are rows updated atomically.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine as Database

metadata = MetaData()

tool_audit = Table(
    "tool_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    # Indexed for the router, which asks whether a conversation's last turn had a failed call.
    Column("request_id", String(64), index=True),
    Column("tenant", String(128)),
    Column("user", String(128)),
    Column("key_id", String(64)),
    Column("tool", String(128), nullable=False, index=True),
    Column("arguments", Text),  # redacted
    Column("status", String(32), nullable=False),
    Column("error", Text),
    Column("duration_ms", Float),
    Column("attempts", Integer),
    Column("action_id", String(64)),
)

# Every rail that blocked, masked or neutralised something; the reason, never the text.
guard_events = Table(
    "guard_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("request_id", String(64), index=True),
    Column("tenant", String(128)),
    Column("user", String(128)),
    Column("stage", String(32), nullable=False),
    Column("rail", String(128), nullable=False),
    Column("action", String(32), nullable=False),
    Column("reason", Text),
)

# Spans of every turn's trace (telemetry/tracing.py); attributes are masked JSON.
trace_spans = Table(
    "trace_spans",
    metadata,
    Column("span_id", String(16), primary_key=True),
    Column("trace_id", String(32), nullable=False, index=True),
    Column("parent_id", String(16)),
    Column("name", String(256), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("start_time", Float, nullable=False, index=True),
    Column("end_time", Float, nullable=False),
    Column("status", String(16), nullable=False),
    # Set on a turn's root span: whose trace it is (GET scoping, forgetting a user).
    Column("tenant", String(128)),
    Column("user", String(128)),
    Column("attributes", Text),
)

# One row per model turn: tokens, the engine time attributed to it and what that cost.
usage_records = Table(
    "usage_records",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("at", Float, nullable=False, index=True),
    Column("tenant", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("key_id", String(64), index=True),
    Column("conversation_id", String(64), index=True),
    Column("model", String(128), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("engine_seconds", Float, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("duration_s", Float, nullable=False),
    Column("trace_id", String(32)),
    Index("ix_usage_tenant", "tenant", "at"),
)

# A turn run by agents (`agent:<name>`), split by agent: the handoff decisions each made
# and the answer of the one that took the turn. Totals equal the turn's usage row.
agent_usage = Table(
    "agent_usage",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("agent", String(64), primary_key=True),
    Column("at", Float, nullable=False, index=True),
    Column("tenant", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("key_id", String(64)),
    Column("conversation_id", String(64)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("engine_seconds", Float, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Index("ix_agent_usage_tenant", "tenant", "at"),
)

# A workflow's run in one conversation (server/workflows): its typed state, the node it
# is on and its status. Written after every node, so a run paused for the user resumes
# on any replica, after a restart; `version` makes two replicas resuming it at once
# conflict instead of both running the node.
workflow_runs = Table(
    "workflow_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("conversation_id", String(64), nullable=False),
    Column("workflow", String(64), nullable=False),
    Column("node", String(64), nullable=False),
    Column("status", String(32), nullable=False),  # running | waiting | completed | declined | handed_off | failed
    Column("state", Text, nullable=False),
    Column("action_id", String(64)),  # the pending action a confirm node waits on
    Column("version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_workflow_runs_conversation", "tenant", "user", "conversation_id", "workflow"),
)

# Batches (server/batches): one row per batch with its status, counts and timestamps, and
# one row per input line with its result, written as each line finishes. A restarted
# server (or another replica, once the lease runs out) goes on from the first line not
# done, and nothing a line already answered is lost or run twice.
batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("key_id", String(64)),  # whose scopes and budget the lines run under
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    # validating | failed | in_progress | finalizing | completed | expired | cancelling | cancelled
    Column("status", String(16), nullable=False),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors", Text),  # JSON: the input file's problems, when it failed validation
    Column("metadata", Text),  # JSON: the client's key-value pairs
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", Integer, nullable=False, default=0),  # of the lines answered
    Column("output_tokens", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float),
    Column("finalizing_at", Float),
    Column("completed_at", Float),
    Column("failed_at", Float),
    Column("expired_at", Float),
    Column("cancelling_at", Float),
    Column("cancelled_at", Float),
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("served_at", Float),  # when a worker last gave it its turn: batches take turns
    Index("ix_batches_tenant", "tenant", "created_at"),
    Index("ix_batches_status", "status"),
)

batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("line", Integer, primary_key=True),  # 1-based, as in the input file
    Column("custom_id", String(512), nullable=False),
    Column("body", Text, nullable=False),  # JSON: the request's body
    Column("status_code", Integer),  # None: not done yet
    Column("request_id", String(64)),
    Column("response", Text),  # JSON: the response body (an error body for a 4xx/5xx)
    Column("error", Text),  # JSON {code, message}: the line got no response (expired, cancelled)
    Column("finished_at", Float),
)

# Per-key spend against its budget, and the holds of requests in progress. A request is
# admitted in one transaction that locks its key's row, drops expired holds and adds its
# own only if spent + held + its hold stays within the limit: concurrent requests (and
# replicas sharing the database) can never admit more than the budget covers. A hold
# expires, so a replica that dies mid-request does not keep the money held for ever.
key_budgets = Table(
    "key_budgets",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("spent_usd", Float, nullable=False, default=0.0),
)

budget_holds = Table(
    "budget_holds",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", String(64), nullable=False, index=True),
    Column("usd", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

pending_actions = Table(
    "pending_actions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128)),
    Column("user", String(128)),
    Column("key_id", String(64)),
    Column("tool", String(128), nullable=False),
    Column("arguments", Text, nullable=False),  # exact, needed to execute; never logged
    Column("summary", Text, nullable=False),
    # pending → executing → succeeded | failed; pending → cancelled | expired
    Column("status", String(16), nullable=False),
    Column("result", Text),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("decided_at", Float),
    Column("decided_by", String(128)),
)


# A conversation is a tree of stored turns: each turn names its parent, so a client can
# continue from any stored response (previous_response_id), and `head` is where a named
# conversation goes on by default.
conversations = Table(
    "conversations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("name", String(256)),  # the client's own name for it (chat completions)
    Column("head", String(64)),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("tenant", "user", "name"),
)

turns = Table(
    "turns",
    metadata,
    Column("id", String(64), primary_key=True),  # resp_… or chatcmpl-…
    Column("conversation_id", String(64), nullable=False, index=True),
    Column("parent_id", String(64)),
    Column("depth", Integer, nullable=False),  # 1 for the first turn
    Column("tenant", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("model", String(128)),
    # The agent that answered it (a turn asked for as `agent:<name>`): the next turn of
    # the branch starts with it.
    Column("agent", String(64)),
    Column("created_at", Float, nullable=False),
    # Chat-shaped messages this turn added (new input, then the assistant's answer):
    # what the context window replays.
    Column("messages", Text, nullable=False),
    # The Responses-API object as returned, and its input items (GET /v1/responses/…).
    Column("response", Text),
    Column("input_items", Text),
    # The running summary of every turn up to depth `summary_through` on this branch.
    Column("summary", Text),
    Column("summary_through", Integer),
    Index("ix_turns_owner", "tenant", "user"),
)

# Episodic memory's text lives here, not in Chroma: Chroma keeps only the vectors and a
# hashed owner, so forgetting a user leaves no readable trace in the vector files.
memories = Table(
    "memories",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("conversation_id", String(64)),
    Column("turn_id", String(64)),
    Column("kind", String(16), nullable=False),  # said | fact
    Column("text", Text, nullable=False),  # redacted
    Column("created_at", Float, nullable=False),
    Index("ix_memories_owner", "tenant", "user"),
)

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

# Uploaded bytes live in the database, not on a replica's disk, so any replica can read a
# file that another accepted (and deleting the row deletes the file).
file_contents = Table(
    "file_contents",
    metadata,
    Column("file_id", String(64), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

vector_stores = Table(
    "vector_stores",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False, index=True),
    Column("name", String(256)),
    Column("metadata", Text),
    Column("created_at", Float, nullable=False),
)

vector_store_files = Table(
    "vector_store_files",
    metadata,
    Column("vector_store_id", String(64), primary_key=True),
    Column("file_id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("status", String(16), nullable=False),  # in_progress | completed | failed
    Column("chunks", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    # The ingestion queue (server/memory/ingestion.py): which worker holds the file and
    # until when, and how many times one has taken it.
    Column("lease_owner", String(64)),
    Column("lease_until", Float),
    Column("attempts", Integer, nullable=False, default=0, server_default="0"),
    Index("ix_vector_store_files_status", "status"),
)


# The response cache (memory/response_cache.py): answers kept for a tenant, or for one
# user when they came from that user's memory, conversation or personal data ("owner"
# set). `exact_key` finds the same request again; `context_key` (everything but the
# question) scopes the semantic search, whose vectors are in Chroma. Both keys include
# the digests of the vector stores the answer drew on, so a changed source is a miss.
response_cache = Table(
    "response_cache",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("user", String(128)),  # None: shared by the tenant's users
    Column("model", String(128), nullable=False),
    Column("exact_key", String(64), nullable=False),
    Column("context_key", String(64), nullable=False),
    Column("answer", Text, nullable=False),
    Column("finish_reason", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
    Index("ix_response_cache_exact", "tenant", "exact_key"),
    Index("ix_response_cache_owner", "tenant", "user"),
)

def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def connect(url: str) -> Database:
    """An engine with the schema migrated to the newest revision. SQLite gets WAL and a busy timeout so
    concurrent writers (20 simultaneous approvals) queue instead of failing."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            # Deleted rows are overwritten, not left in free pages: forgetting a user
            # must leave nothing readable in the file.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    from server.migrate import upgrade

    upgrade(engine)
    return engine


def purge_wal(engine: Database) -> None:
    """Fold SQLite's write-ahead log into the database and truncate it, so deleted rows
    do not linger in the -wal file (no-op elsewhere)."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
