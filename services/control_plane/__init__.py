"""The control plane: tenants, API keys, conversation records and feedback, kept in SQL.

SQLAlchemy 2 over PostgreSQL in production and a SQLite file on a dev box; the schema is
owned by the Alembic migrations in ``migrations/``. Orchestrator replicas read tenants and
keys from here (:mod:`.directory`), write conversation records off the hot path
(:mod:`.recorder`), and answer insights and exports from it (:mod:`.insights`).
"""
