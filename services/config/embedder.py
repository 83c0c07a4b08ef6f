"""Config of the Embedder deployment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.config.base import DeploymentOptions, StrictModel


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
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")
