"""The tables of the control-plane store (SQLAlchemy 2 declarative models).

Times are UTC. Keys are kept as digests only. A conversation record holds redacted text
and a keyed hash of the shopper's id, never the id itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Now, in UTC (every stored time is)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone: it is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Store in UTC."""
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Read back as UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Base of the control-plane models."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Tenant(Base):
    """A brand: its assistant's profile."""

    __tablename__ = "tenants"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    persona: Mapped[str] = mapped_column(Text)
    fallback_message: Mapped[str | None] = mapped_column(Text)
    relevance_threshold: Mapped[float | None] = mapped_column(Float)
    adapter: Mapped[str | None] = mapped_column(String(64))
    storefront_url: Mapped[str | None] = mapped_column(String(2048))
    credentials_env: Mapped[str | None] = mapped_column(String(128))
    tools_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    retention_days: Mapped[int | None] = mapped_column(Integer)
    #: Standard replies and order-id patterns: the rest of the profile, as the config has it.
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: "config" while the config file's seed owns it; "api" once changed through the admin API.
    managed_by: Mapped[str] = mapped_column(String(16), default="config")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """One API key: its digest, scope and lifecycle."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(80), unique=True)
    #: storefront, operator or ingest (with a tenant), or admin (without).
    scope: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(ForeignKey("tenants.tenant", ondelete="CASCADE"), index=True)
    label: Mapped[str | None] = mapped_column(String(200))
    #: "config" (seeded from the config file or CS_* keys) or "issued" (by the admin API or CLI).
    origin: Mapped[str] = mapped_column(String(16), default="issued")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    rotated_at: Mapped[datetime | None]
    #: Set by a rotation: the key stays valid until then, beside its replacement.
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    replaced_by: Mapped[str | None] = mapped_column(String(32))


class Revision(Base):
    """One row counting changes to tenants and keys: replicas poll it and reload when it moves."""

    __tablename__ = "control_revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConversationRecord(Base):
    """One reply as it was given (text redacted), with what it rested on."""

    __tablename__ = "conversation_records"
    __table_args__ = (
        Index("ix_records_tenant_created", "tenant", "created_at"),
        Index("ix_records_tenant_outcome_created", "tenant", "outcome", "created_at"),
    )

    reply_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    user_hash: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str | None] = mapped_column(String(128))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    sources: Mapped[list[Any]] = mapped_column(default=list)
    confidence: Mapped[float] = mapped_column(Float, default=0.0)
    intent: Mapped[str | None] = mapped_column(String(32))
    #: answered, fallback, handover, guardrail, tool or error.
    outcome: Mapped[str] = mapped_column(String(16))
    adapter: Mapped[str | None] = mapped_column(String(160))
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The question's embedding (float16), kept for unanswered questions only: they are clustered.
    question_vector: Mapped[bytes | None] = mapped_column(LargeBinary)


class Feedback(Base):
    """A shopper's verdict on a reply (it may arrive before the reply's record is written)."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_tenant_created", "tenant", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reply_id: Mapped[str] = mapped_column(String(64), index=True)
    tenant: Mapped[str] = mapped_column(String(64))
    user_hash: Mapped[str] = mapped_column(String(64), index=True)
    helpful: Mapped[bool | None] = mapped_column(Boolean)
    resolved: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Review(Base):
    """An operator's approval or correction of a reply: a question/answer pair for training."""

    __tablename__ = "reviews"

    reply_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    user_hash: Mapped[str] = mapped_column(String(64), index=True)
    #: approved (the answer as given) or corrected (``answer`` replaces it).
    verdict: Mapped[str] = mapped_column(String(16))
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    reviewer: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
