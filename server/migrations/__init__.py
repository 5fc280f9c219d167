"""Alembic migrations of the relational schema (server/db.py); see server/migrate.py."""
