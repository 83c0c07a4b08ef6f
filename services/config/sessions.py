"""Config of conversation memory and of the answer cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.config.base import StrictModel


class SessionConfig(StrictModel):
    """Conversation memory: in process (dev) or Redis (production, any replica continues a conversation)."""

    backend: Literal["memory", "redis"] = Field("memory", description="Where conversations are kept.")
    redis_url: str | None = Field(
        None, description="redis://host:6379/0 without a password; CS_REDIS_URL (with credentials) wins."
    )
    max_turns: int = Field(6, ge=0, le=100, description="Earlier turns (user + assistant pairs) in the prompt.")
    max_history_tokens: int = Field(1500, ge=0, description="Estimated tokens of history in the prompt, at most.")
    ttl_s: int = Field(86400, ge=60, description="Redis: a conversation idle this long is forgotten.")
    max_sessions: int = Field(
        10000, ge=1, description="In process: sessions kept per tenant (its least recently used dropped)."
    )
    redis_timeout_s: float = Field(2.0, gt=0, description="Redis: bound on one command.")


class AnswerCacheConfig(StrictModel):
    """Cache of answers to first questions, keyed by tenant, knowledge generation, adapter and question."""

    backend: Literal["off", "memory", "redis"] = Field("off", description="Where answers are cached.")
    redis_url: str | None = Field(None, description="redis://host:6379/0; CS_REDIS_URL wins.")
    ttl_s: int = Field(3600, ge=1, description="How long an answer is served from the cache.")
    max_entries: int = Field(10000, ge=1, description="In process: answers kept (least recently used dropped).")
    redis_timeout_s: float = Field(0.5, gt=0, description="Redis: bound on one command; a slow cache is a miss.")
    generation_cache_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="How long an orchestrator replica reuses a tenant's knowledge generation for cache keys. 0 (the "
        "default): every first message asks the retriever, so a sync is seen by every replica at once. More saves "
        "that call, but a sync through another replica is seen only that much later, and until then its cached "
        "answers of the previous knowledge are served. An ingest through this replica is seen at once.",
    )
