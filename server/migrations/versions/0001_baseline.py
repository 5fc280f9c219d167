"""baseline: the schema as of the first release

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _create_budgets_conversations_files_guard_events()
    _create_memories_actions_tool_audit()
    _create_trace_spans_turns()
    _create_usage_and_vector_stores()


def _create_budgets_conversations_files_guard_events() -> None:
    """budget_holds, conversations, files, guard_events, key_budgets."""
    op.create_table(
        "budget_holds",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("usd", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("budget_holds", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_budget_holds_key_id"), ["key_id"], unique=False
        )

    op.create_table(
        "conversations",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("head", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "user", "name"),
    )
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("filename", sa.String(length=512), nullable=False),
        sa.Column("purpose", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_files_tenant"), ["tenant"], unique=False)

    op.create_table(
        "guard_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("tenant", sa.String(length=128), nullable=True),
        sa.Column("user", sa.String(length=128), nullable=True),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("rail", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("guard_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_guard_events_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_guard_events_request_id"), ["request_id"], unique=False
        )

    op.create_table(
        "key_budgets",
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key_id"),
    )


def _create_memories_actions_tool_audit() -> None:
    """memories, pending_actions, tool_audit."""
    op.create_table(
        "memories",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("conversation_id", sa.String(length=64), nullable=True),
        sa.Column("turn_id", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.create_index("ix_memories_owner", ["tenant", "user"], unique=False)

    op.create_table(
        "pending_actions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=True),
        sa.Column("user", sa.String(length=128), nullable=True),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("tool", sa.String(length=128), nullable=False),
        sa.Column("arguments", sa.Text(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("decided_at", sa.Float(), nullable=True),
        sa.Column("decided_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "tool_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("tenant", sa.String(length=128), nullable=True),
        sa.Column("user", sa.String(length=128), nullable=True),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("tool", sa.String(length=128), nullable=False),
        sa.Column("arguments", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=True),
        sa.Column("action_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("tool_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tool_audit_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_tool_audit_tool"), ["tool"], unique=False)


def _create_trace_spans_turns() -> None:
    """trace_spans, turns."""
    op.create_table(
        "trace_spans",
        sa.Column("span_id", sa.String(length=16), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=False),
        sa.Column("parent_id", sa.String(length=16), nullable=True),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("start_time", sa.Float(), nullable=False),
        sa.Column("end_time", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=True),
        sa.Column("user", sa.String(length=128), nullable=True),
        sa.Column("attributes", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("span_id"),
    )
    with op.batch_alter_table("trace_spans", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_trace_spans_start_time"), ["start_time"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_trace_spans_trace_id"), ["trace_id"], unique=False
        )

    op.create_table(
        "turns",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=True),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("messages", sa.Text(), nullable=False),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("input_items", sa.Text(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("summary_through", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_turns_conversation_id"), ["conversation_id"], unique=False
        )
        batch_op.create_index("ix_turns_owner", ["tenant", "user"], unique=False)


def _create_usage_and_vector_stores() -> None:
    """usage_records, vector_store_files, vector_stores."""
    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("conversation_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("engine_seconds", sa.Float(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("request_id"),
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_usage_records_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_usage_records_conversation_id"),
            ["conversation_id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_usage_records_key_id"), ["key_id"], unique=False
        )
        batch_op.create_index("ix_usage_tenant", ["tenant", "at"], unique=False)

    op.create_table(
        "vector_store_files",
        sa.Column("vector_store_id", sa.String(length=64), nullable=False),
        sa.Column("file_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("filename", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("vector_store_id", "file_id"),
    )
    op.create_table(
        "vector_stores",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=True),
        sa.Column("metadata", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("vector_stores", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_vector_stores_tenant"), ["tenant"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("vector_stores", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vector_stores_tenant"))

    op.drop_table("vector_stores")
    op.drop_table("vector_store_files")
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_tenant")
        batch_op.drop_index(batch_op.f("ix_usage_records_key_id"))
        batch_op.drop_index(batch_op.f("ix_usage_records_conversation_id"))
        batch_op.drop_index(batch_op.f("ix_usage_records_at"))

    op.drop_table("usage_records")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_index("ix_turns_owner")
        batch_op.drop_index(batch_op.f("ix_turns_conversation_id"))

    op.drop_table("turns")
    with op.batch_alter_table("trace_spans", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_trace_spans_trace_id"))
        batch_op.drop_index(batch_op.f("ix_trace_spans_start_time"))

    op.drop_table("trace_spans")
    with op.batch_alter_table("tool_audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tool_audit_tool"))
        batch_op.drop_index(batch_op.f("ix_tool_audit_at"))

    op.drop_table("tool_audit")
    op.drop_table("pending_actions")
    with op.batch_alter_table("memories", schema=None) as batch_op:
        batch_op.drop_index("ix_memories_owner")

    op.drop_table("memories")
    op.drop_table("key_budgets")
    with op.batch_alter_table("guard_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_guard_events_request_id"))
        batch_op.drop_index(batch_op.f("ix_guard_events_at"))

    op.drop_table("guard_events")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_tenant"))

    op.drop_table("files")
    op.drop_table("conversations")
    with op.batch_alter_table("budget_holds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budget_holds_key_id"))

    op.drop_table("budget_holds")
