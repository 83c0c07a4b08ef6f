"""Config of the Retriever deployment and of how knowledge is chunked."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.config.base import DeploymentOptions, StrictModel


class ChunkingConfig(StrictModel):
    """How knowledge documents are cut into chunks before embedding."""

    max_tokens: int = Field(
        384, ge=16, le=2048, description="Largest chunk in embedder tokens, title included; capped at max_length."
    )
    overlap_tokens: int = Field(
        48, ge=0, description="Tokens of the previous chunk's last sentences repeated when a section continues."
    )

    @model_validator(mode="after")
    def _overlap_below_max(self) -> ChunkingConfig:
        if self.overlap_tokens >= self.max_tokens // 2:
            raise ValueError("overlap_tokens must be less than half of max_tokens")
        return self


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
    timeout_s: float = Field(10, gt=0, description="Timeout of one Milvus call.")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @property
    def is_lite(self) -> bool:
        """Whether the URI names a Milvus Lite file rather than a server."""
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "unix:"))
