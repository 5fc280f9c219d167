"""agents: the agent that answered a stored turn, and usage split by agent

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("agent", sa.String(length=64), nullable=True))
    op.create_table(
        "agent_usage",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("agent", sa.String(length=64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("conversation_id", sa.String(length=64), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("engine_seconds", sa.Float(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "agent"),
    )
    op.create_index("ix_agent_usage_tenant", "agent_usage", ["tenant", "at"], unique=False)
    op.create_index(op.f("ix_agent_usage_at"), "agent_usage", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_agent_usage_at"), table_name="agent_usage")
    op.drop_index("ix_agent_usage_tenant", table_name="agent_usage")
    op.drop_table("agent_usage")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_column("agent")
