"""Config of the Retriever deployment and of how knowledge is chunked."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.config.base import DeploymentOptions, StrictModel


class ChunkingConfig(StrictModel):
    """How knowledge documents are cut into chunks before embedding."""

    max_tokens: int = Field(
        384,
        ge=16,
        le=2048,
        strict=True,
        description="Largest chunk in embedder tokens, title included; capped at max_length.",
    )
    overlap_tokens: int = Field(
        48,
        ge=0,
        strict=True,
        description="Tokens of the previous chunk's last sentences repeated when a section continues.",
    )

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError("overlap_tokens must be less than half of max_tokens")
        return self


class SyncLeaseConfig(StrictModel):
    """Where the one-sync-per-tenant lease lives (services/knowledge/lease.py)."""

    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: one Retriever replica (Milvus Lite); redis: any number of replicas."
    )
    redis_url: str | None = Field(None, description="redis://host:6379/0 without a password; CS_REDIS_URL wins.")
    ttl_s: float = Field(
        60, ge=5, description="A lease not renewed this long is free (a replica died mid-run); renewed every ttl/3."
    )


class RetrieverConfig(StrictModel):
    """The Milvus knowledge store and hybrid search."""

    milvus_uri: str = Field(description="A local path for Milvus Lite (dev box) or http(s)://host:19530 for a server.")
    collection: str = Field("knowledge_chunks", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="Collection.")
    enable_bm25: bool = Field(True, description="Add a BM25 full-text search on the chunk text.")
    bm25_analyzer: dict[str, Any] = Field(
        default_factory=lambda: {"tokenizer": "jieba", "filter": ["lowercase"]},
        description="Milvus analyzer_params of the text field; jieba segments Chinese and splits English words.",
    )
    dense_index_type: Literal["AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT"] = Field("AUTOINDEX", description="Index.")
    candidates_per_signal: int = Field(20, ge=1, le=1000, description="Hits fetched per signal before fusion.")
    rrf_k: int = Field(60, ge=1, description="RRF constant: score = sum weight / (k + rank).")
    signal_weights: dict[Literal["dense", "sparse", "bm25"], float] = Field(
        default_factory=dict,
        description="Weight of each signal in RRF (default 1); raise bm25 when the embedder is weak in a language.",
    )
    timeout_s: float = Field(
        10,
        gt=0,
        description="Timeout of one call to Milvus over gRPC (a Lite file's searches run in process, with none).",
    )
    generation_cache_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="How long a search reuses the tenant's committed generation before reading it again (0: every "
        "search reads it). A commit waits twice this long before deleting the rows it retired, so a search that "
        "still uses the previous generation sees all of it.",
    )
    sync_lease: SyncLeaseConfig = Field(
        default_factory=SyncLeaseConfig, description="The lease that lets one knowledge sync per tenant run at a time."
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @model_validator(mode="after")
    def _one_writer_or_a_shared_lease(self) -> RetrieverConfig:
        if self.sync_lease.backend == "memory" and self.deployment.num_replicas != 1:
            raise ValueError(
                "several Retriever replicas need sync_lease.backend: redis, so that two syncs of one tenant never run "
                "at once on different replicas"
            )
        return self

    @property
    def is_lite(self) -> bool:
        """Whether the URI names a Milvus Lite file rather than a server."""
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "unix:"))
