"""Sync one source of documents into one tenant's knowledge base.

Unchanged chunks (same id and content hash) are not re-embedded; chunks whose source
record disappeared are deleted. Embedding uses the Embedder deployment's own backend,
so stored passages and live queries are always encoded by the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from knowledge_sync.chunking import chunk_document
from knowledge_sync.documents import KnowledgeDocument
from services.embedder import EmbeddingBackend
from services.retriever import MilvusKnowledgeStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    """What a sync run changed."""

    documents: int
    chunks: int
    embedded: int
    unchanged: int
    deleted: int


def sync_documents(
    store: MilvusKnowledgeStore,
    embedder: EmbeddingBackend,
    tenant: str,
    source: str,
    documents: list[KnowledgeDocument],
    *,
    max_chunk_chars: int = 800,
    batch_size: int = 32,
) -> SyncReport:
    """Make the tenant's chunks from ``source`` equal to ``documents``."""
    chunks = [c for doc in documents for c in chunk_document(tenant, source, doc, max_chunk_chars)]
    stored = store.content_hashes(tenant, source)
    changed = [c for c in chunks if stored.get(c.id) != c.content_hash]
    for start in range(0, len(changed), batch_size):
        batch = changed[start : start + batch_size]
        embeddings = embedder.encode([f"{c.title}\n{c.text}" for c in batch], "passage")
        store.upsert(batch, embeddings)
        logger.info("embedded %d/%d changed chunks", start + len(batch), len(changed))
    wanted = {c.id for c in chunks}
    stale = sorted(set(stored) - wanted)
    store.delete_ids(stale)
    return SyncReport(
        documents=len(documents),
        chunks=len(chunks),
        embedded=len(changed),
        unchanged=len(chunks) - len(changed),
        deleted=len(stale),
    )
