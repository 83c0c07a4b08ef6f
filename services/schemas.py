"""Data contracts passed between deployments and over the public API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.config import SamplingConfig


class Embedding(BaseModel):
    """One text's embedding: a normalized dense vector and, for BGE-M3, sparse weights."""

    dense: list[float]
    sparse: dict[int, float] | None = None


class KnowledgeChunk(BaseModel):
    """One chunk of a knowledge document as stored in Milvus."""

    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    source: str
    doc_id: str
    chunk_no: int
    title: str
    text: str
    category: str = ""
    updated_at: int = Field(0, description="Unix seconds of the source record's last change.")
    content_hash: str


class RetrievedChunk(BaseModel):
    """A search hit with the scores of every signal that found it."""

    chunk: KnowledgeChunk
    score: float = Field(description="Fused RRF score (rank-based, for ordering).")
    dense_score: float | None = Field(None, description="Cosine similarity of the dense vectors, if found by it.")
    sparse_score: float | None = Field(None, description="Learned sparse (BGE-M3) inner product, if found by it.")
    bm25_score: float | None = Field(None, description="BM25 score of the text, if found by it.")
    rerank_score: float | None = Field(
        None, description="Cross-encoder score (0..1) of the question with this chunk, when the hits were reranked."
    )


class SearchResult(BaseModel):
    """The fused hits of a search, and what the dense signal found on its own."""

    hits: list[RetrievedChunk] = Field(description="Best first by fused RRF score.")
    dense_candidates: list[float] = Field(
        default_factory=list,
        description="Cosine similarities of the dense signal's own candidates, best first, before fusion: the "
        "relevance gate's margin is measured against them, so the other signals cannot move it.",
    )


class ChatMessage(BaseModel):
    """One message of a chat-template conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class GenerationRequest(BaseModel):
    """What the LLM deployment generates from."""

    messages: list[ChatMessage] = Field(min_length=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    tools: list[dict[str, Any]] | None = Field(
        None, description="OpenAI-style function specs, rendered by the model's chat template (Qwen: Hermes style)."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="Constrain the output to this JSON schema (vLLM structured output)."
    )
    tenant: str | None = Field(None, description="Whose request it is: the tenant label of the token metrics.")


class ToolCall(BaseModel):
    """A function call the model asked for."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class GenerationChunk(BaseModel):
    """A streamed piece of generated text; the last one carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="On the last chunk, when the model called tools.")
