"""Sync one source's documents into one tenant's knowledge base, as one atomic run.

Documents are chunked with the embedder's tokenizer and embedded with the Embedder
deployment's own backend, so stored passages and live queries are always encoded by the
same code. Chunk ids carry their content hash, so an unchanged chunk keeps its row and is
not embedded again; changed chunks get new rows. Everything becomes visible at once when
the run commits (see :mod:`services.knowledge.store`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from services.config import SOURCE_PATTERN, ChunkingConfig
from services.errors import ConflictError
from services.knowledge.chunking import chunk_documents
from services.knowledge.documents import KnowledgeDocument
from services.knowledge.store import MilvusKnowledgeStore, SourceState
from services.schemas import Embedding, KnowledgeChunk

logger = logging.getLogger(__name__)

# Texts per embedding call. FlagEmbedding's encode() runs its first (longest) batch twice
# to probe for out-of-memory, so larger calls amortize that extra forward pass.
EMBED_BATCH = 256
# Special tokens ([CLS], [SEP]) the embedder adds around each text.
_SPECIAL_TOKENS = 2
_SOURCE_NAME = re.compile(SOURCE_PATTERN)


class PassageEncoder(Protocol):
    """What the pipeline needs from the embedder (a backend or the deployment's handle)."""

    @property
    def max_length(self) -> int:
        """Tokens the model reads per text."""
        ...

    def encode(self, texts: list[str], kind: Any) -> list[Embedding]:
        """Embed texts."""
        ...

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Count tokens with the model's tokenizer."""
        ...


class SourceBatch(BaseModel):
    """What one pull of a source gave: documents to put, documents to delete, the next cursor."""

    model_config = ConfigDict(extra="forbid")

    # Strict: a JSON 0 or "false" is no boolean, and here it decides what is deleted.
    complete: bool = Field(
        strict=True,
        description="True when documents are the whole source (documents not in it are deleted); "
        "False for an incremental pull (only the given documents change).",
    )
    documents: list[KnowledgeDocument] = Field(default_factory=list, max_length=200_000)
    deleted_doc_ids: list[str] = Field(default_factory=list, description="Records the source reports as deleted.")
    kept_doc_ids: list[str] = Field(
        default_factory=list,
        description="Records that were rejected this time: their stored versions stay, even in a complete pull.",
    )
    cursor: Any = Field(None, description="Updated-since value to start the next incremental pull from.")
    cursor_is_datetime: bool = Field(False, strict=True)
    rejected: int = Field(
        0,
        ge=0,
        le=100_000_000,
        strict=True,
        description="Records of this pull the job rejected (kept as the run's count).",
    )


class MassDeleteError(ConflictError):
    """A complete pull that would delete most of a source: usually a broken export, not a decision."""

    code = "mass_delete_refused"


def check_mass_delete(source: str, previous_documents: int, batch: SourceBatch, max_fraction: float) -> None:
    """Refuse a complete pull that would delete more than ``max_fraction`` of the source's documents.

    Raises:
        MassDeleteError: it would; nothing was changed.

    """
    if not batch.complete or previous_documents == 0:
        return
    vanishing = previous_documents - len(batch.documents) - len(batch.kept_doc_ids)
    if vanishing > max_fraction * previous_documents:
        raise MassDeleteError(
            f"source {source}: this pull would delete {vanishing} of {previous_documents} documents "
            f"(more than max_delete_fraction {max_fraction:g}); nothing was changed. If that is intended, "
            "send it again allowing a mass delete (cs-knowledge-sync --allow-mass-delete)"
        )


class SyncReport(BaseModel):
    """What a run changed, counted in source records (documents) and in chunks."""

    tenant: str
    source: str
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    rejected: int = 0
    chunks_embedded: int = 0
    chunks_retired: int = 0
    generation: int = Field(0, description="Knowledge-base generation after the run.")
    seconds: float = 0


def sync_source(
    store: MilvusKnowledgeStore,
    embedder: PassageEncoder,
    tenant: str,
    source: str,
    batch: SourceBatch,
    chunking: ChunkingConfig,
    *,
    on_embedded: Callable[[int, int], None] | None = None,
    max_delete_fraction: float | None = None,
) -> SyncReport:
    """Apply one source's batch to the tenant's knowledge base and commit it.

    Args:
        store: The knowledge store.
        embedder: Encodes passages and counts tokens.
        tenant: Tenant id.
        source: Source name (its chunks are diffed only against this source's).
        batch: Documents, deletions and the cursor of this pull.
        chunking: Chunk size and overlap; capped to what the embedder reads.
        on_embedded: Called with (chunks embedded so far, chunks to embed) for progress.
        max_delete_fraction: Refuse a complete pull deleting more of the source than this
            (checked against the committed state, under the run's lease); None: no check.

    Returns:
        The counts of this run.

    Raises:
        ConflictError: another run committed meanwhile; nothing changed.
        MassDeleteError: the pull would delete more than ``max_delete_fraction``; nothing changed.
        KnowledgeBaseUnavailableError: Milvus failed; nothing changed.

    """
    started = time.monotonic()
    if not _SOURCE_NAME.fullmatch(source):
        raise ValueError(f"invalid source name {source!r}")
    generation = store.begin(tenant)
    state = store.tenant_state(tenant)
    if max_delete_fraction is not None:  # before anything is staged: a refusal changes nothing
        previous = state.sources.get(source, SourceState())
        check_mass_delete(source, previous.documents, batch, max_delete_fraction)
    live: dict[str, set[str]] = defaultdict(set)
    for row in store.live_chunks(tenant, source):
        live[row.doc_id].add(row.id)
    live_ids = {i for ids in live.values() for i in ids}
    chunks = chunk_documents(tenant, source, batch.documents, embedder.count_tokens, _fitted(chunking, embedder))
    new: dict[str, set[str]] = defaultdict(set)
    for chunk in chunks:
        new[chunk.doc_id].add(chunk.id)

    in_scope = set(live) | set(new) if batch.complete else set(new) | set(batch.deleted_doc_ids)
    in_scope -= set(batch.kept_doc_ids) - set(new)
    to_stage = [c for c in chunks if c.id not in live_ids]
    to_retire = sorted(i for doc in in_scope for i in live.get(doc, set()) - new.get(doc, set()))
    report = _count_documents(
        SyncReport(tenant=tenant, source=source, chunks_embedded=len(to_stage), chunks_retired=len(to_retire)),
        in_scope, live, new,
    )  # fmt: skip
    _stage(store, embedder, to_stage, generation, on_embedded)
    store.retire(to_retire, generation)

    state.sources[source] = _next_source_state(
        state.sources.get(source, SourceState()), batch, documents=len(set(live) - in_scope) + len(new)
    )
    changed = bool(to_stage or to_retire)
    store.commit(tenant, generation, state, data_changed=changed)
    report.generation = generation if changed else generation - 1
    report.seconds = round(time.monotonic() - started, 3)
    logger.info(
        "tenant %s source %s: +%d ~%d -%d =%d documents, %d chunks embedded, generation %d",
        tenant, source, report.added, report.updated, report.deleted, report.unchanged,
        report.chunks_embedded, report.generation,
    )  # fmt: skip
    return report


def _fitted(chunking: ChunkingConfig, embedder: PassageEncoder) -> ChunkingConfig:
    """The chunking capped to what the embedder reads (its max length less the special tokens)."""
    max_tokens = min(chunking.max_tokens, embedder.max_length - _SPECIAL_TOKENS)
    overlap = min(chunking.overlap_tokens, max_tokens // 2 - 1)
    return chunking.model_copy(update={"max_tokens": max_tokens, "overlap_tokens": overlap})


def _count_documents(
    report: SyncReport, in_scope: set[str], live: dict[str, set[str]], new: dict[str, set[str]]
) -> SyncReport:
    """Count the run's documents as added, updated, deleted or unchanged (by their chunk ids)."""
    for doc in in_scope:
        if doc not in new:
            report.deleted += doc in live
        elif doc not in live:
            report.added += 1
        elif live[doc] == new[doc]:
            report.unchanged += 1
        else:
            report.updated += 1
    return report


def _stage(
    store: MilvusKnowledgeStore,
    embedder: PassageEncoder,
    chunks: list[KnowledgeChunk],
    generation: int,
    on_embedded: Callable[[int, int], None] | None,
) -> None:
    """Embed and write the new chunk versions (invisible until the commit), in embedding batches."""
    for start in range(0, len(chunks), EMBED_BATCH):
        part = chunks[start : start + EMBED_BATCH]
        store.stage(part, embedder.encode([f"{c.title}\n{c.text}" for c in part], "passage"), generation)
        if on_embedded:
            on_embedded(start + len(part), len(chunks))


def _next_source_state(previous: SourceState, batch: SourceBatch, *, documents: int) -> SourceState:
    """The source's state after this run: the new cursor (or the old one), times, document count."""
    now = time.time()
    has_cursor = batch.cursor is not None
    return SourceState(
        cursor=batch.cursor if has_cursor else previous.cursor,
        cursor_is_datetime=batch.cursor_is_datetime if has_cursor else previous.cursor_is_datetime,
        last_success=now,
        last_full_sync=now if batch.complete else previous.last_full_sync,
        documents=documents,
        rejected=batch.rejected,
    )
