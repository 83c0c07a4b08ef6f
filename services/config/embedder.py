"""Config of the Embedder deployment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.config.base import DeploymentOptions, StrictModel


class RerankerConfig(StrictModel):
    """A cross-encoder that scores (question, passage) pairs (FlagEmbedding ``FlagReranker``)."""

    model: str = Field(description="Model folder or hub id, e.g. BAAI/bge-reranker-v2-m3.")
    max_length: int = Field(512, ge=8, le=8192, description="Token limit per (question, passage) pair.")
    use_fp16: bool = Field(False, description="Half precision; only on GPUs.")
    batch_size: int = Field(32, ge=1, description="Pairs scored per forward pass.")


class EmbedderConfig(StrictModel):
    """The embedding model (FlagEmbedding)."""

    model: str = Field(description="Model folder or hub id, e.g. BAAI/bge-m3.")
    family: Literal["bge-m3", "dense"] = Field(
        description="'bge-m3' loads BGEM3FlagModel (dense + sparse); 'dense' loads FlagModel (dense only)."
    )
    pooling_method: Literal["cls", "mean"] = Field(
        "cls", description="Pooling of dense models: BGE uses cls, sentence-transformers models use mean."
    )
    query_instruction: str | None = Field(None, description="Prefix put before queries (not passages).")
    passage_instruction: str | None = Field(None, description="Prefix put before passages.")
    max_length: int = Field(512, ge=8, le=8192, description="Token limit per text.")
    use_fp16: bool = Field(False, description="Half precision; only on GPUs.")
    device: str | None = Field(None, description="'cpu', 'cuda:0', ...; None lets FlagEmbedding choose.")
    max_batch_size: int = Field(32, ge=1, description="Largest batch @serve.batch forms.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")
    reranker: RerankerConfig | None = Field(
        None,
        description="A cross-encoder loaded beside the embedding model, for orchestrator.reranking; None loads none.",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")
