"""response cache: answers kept per tenant (or per user), by exact and context key

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "response_cache",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("exact_key", sa.String(length=64), nullable=False),
        sa.Column("context_key", sa.String(length=64), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_response_cache_exact", "response_cache", ["tenant", "exact_key"], unique=False)
    op.create_index("ix_response_cache_owner", "response_cache", ["tenant", "user"], unique=False)
    op.create_index(op.f("ix_response_cache_expires_at"), "response_cache", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_response_cache_expires_at"), table_name="response_cache")
    op.drop_index("ix_response_cache_owner", table_name="response_cache")
    op.drop_index("ix_response_cache_exact", table_name="response_cache")
    op.drop_table("response_cache")
