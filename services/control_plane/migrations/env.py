"""Alembic environment of the control-plane store: run by :func:`services.control_plane.schema.upgrade`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from services.control_plane.models import Base

config = context.config
connection = config.attributes.get("connection")


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite alters a table by copying it; PostgreSQL alters in place.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    engine = engine_from_config(
        config.get_section(config.config_ini_section) or {}, prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as conn:
        _run(conn)
