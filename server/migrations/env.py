"""Alembic environment: runs on the connection server/migrate.py hands over, so the
migration shares its transaction (and, on PostgreSQL, its advisory lock)."""

from alembic import context

from server.db import metadata

connection = context.config.attributes["connection"]
# SQLite cannot ALTER most things in place: batch mode copies the table instead.
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
