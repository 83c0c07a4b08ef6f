"""Config of the control-plane store: tenants, API keys, conversation records and feedback."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.config.base import StrictModel

#: Kinds of personal data the built-in redaction patterns find (in Chinese and English text).
PersonalData = Literal["email", "phone", "address", "order_id"]
PERSONAL_DATA: tuple[PersonalData, ...] = ("email", "phone", "address", "order_id")


class ControlPlaneConfig(StrictModel):
    """Where tenants, keys, conversation records and feedback are kept, and how they propagate."""

    url: str = Field(
        "sqlite:///data/control-plane.db",
        description="SQLAlchemy URL of the store: a SQLite file on a dev box (a relative path starts from the "
        "config's directory), PostgreSQL in production ('postgresql+psycopg://...', usually from "
        "CS_CONTROL_PLANE_URL, which overrides this).",
    )
    refresh_interval_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="How often each orchestrator replica reads the store's revision and, when it changed, reloads "
        "tenants and keys: the longest a revoked key stays valid on a replica, plus one read.",
    )
    record_conversations: bool = Field(True, description="Record every reply (redacted) for insights and review.")
    record_queue_size: int = Field(
        10_000,
        ge=1,
        description="Replies waiting to be written; beyond it a record is dropped and counted, never waited for.",
    )
    record_batch_size: int = Field(200, ge=1, description="Most records written in one transaction.")
    redact: list[PersonalData] = Field(
        default_factory=lambda: list(PERSONAL_DATA),
        description="Personal data replaced before a record is stored: e-mail addresses, phone numbers, postal "
        "addresses, and order ids (by each tenant's order_id_patterns).",
    )
    retention_days: int = Field(
        90,
        ge=1,
        le=36_500,
        description="Days a conversation record is kept, unless its tenant sets its own retention_days.",
    )
    key_rotation_grace_s: float = Field(
        86_400, ge=0, description="How long a rotated key stays valid beside its replacement, unless a call says."
    )
    cluster_similarity: float = Field(
        0.85,
        ge=0,
        le=1,
        description="Least cosine similarity of two unanswered questions' embeddings for insights to put them in "
        "one cluster; it depends on the embedder (e5-small: 0.88, measured in docs/control-plane.md).",
    )
    store_timeout_s: float = Field(5, gt=0, description="Bound on one read or write of the store.")
