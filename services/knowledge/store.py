"""The knowledge-chunk collection in Milvus, with atomic sync runs.

Shared by the Retriever deployment (reads, and writes for in-app ingest) and the
knowledge-sync job (writes).

**Atomic runs.** Milvus has no transactions, so visibility is versioned per tenant. Each
row carries ``gen_from`` (the sync run that wrote it) and ``gen_to`` (the run that retired
it; :data:`LIVE` while current). A small state collection holds each tenant's committed
generation ``C`` and its sources' cursors; searches see only rows with
``gen_from <= C < gen_to``. A run takes ``N = C + 1``, writes new chunk versions with
``gen_from = N`` (invisible), marks replaced ones with ``gen_to = N`` (still visible), and
commits by writing ``C = N`` together with the new cursors: one single-row upsert, so the
assistant sees the whole run or none of it. Afterwards rows retired at or before ``N`` are
deleted. A run that dies before its commit leaves only invisible rows and marks, which the
next run removes before it starts (:meth:`MilvusKnowledgeStore.begin`).

One sync per tenant at a time is assumed (a CronJob with ``concurrencyPolicy: Forbid``;
the app serializes its ingests); a commit that finds the generation moved fails with
:class:`~services.errors.ConflictError` and changes nothing.

**Hybrid search** runs one search per signal (dense, learned sparse when the embedder
gives it, BM25 on the text when enabled), each filtered to the tenant's visible rows, and
fuses the ranked lists with reciprocal rank fusion (a signal's equal scores ranked by chunk id,
so that a question always gets the same ranking). Fusion happens here rather than in
Milvus' ``hybrid_search`` because the orchestrator needs each signal's own score: RRF
scores are rank-based and cannot tell a relevant first hit from an irrelevant one, while
the dense cosine similarity can. (Milvus Lite also ignores ``hybrid_search(filter=...)``.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from services.config import TENANT_PATTERN, RetrieverConfig
from services.errors import ConflictError, InvalidRequestError, KnowledgeBaseUnavailableError
from services.knowledge.collections import (
    BM25_FIELD,
    DENSE_FIELD,
    SCALAR_FIELDS,
    SPARSE_FIELD,
    ensure_chunk_collection,
    ensure_state_collection,
)
from services.schemas import Embedding, KnowledgeChunk, RetrievedChunk, SearchResult

logger = logging.getLogger(__name__)

LIVE = 2**62
"""``gen_to`` of a row no run has retired."""

_WRITE_BATCH = 512
_ITERATOR_BATCH = 4096
_QUERY_LIMIT = 16384
_T = TypeVar("_T")


def quote(value: str) -> str:
    """Quote a string literal for a Milvus filter expression."""
    return json.dumps(value, ensure_ascii=False)


_TENANT_ID = re.compile(TENANT_PATTERN)


def tenant_filter(tenant: str) -> str:
    """Filter expression scoping a query to one tenant; refuses ids that are not plain names."""
    if not _TENANT_ID.fullmatch(tenant):
        raise InvalidRequestError(f"invalid tenant id {tenant!r}")
    return f"tenant == {quote(tenant)}"


def rrf_fuse(ranked_lists: Iterable[tuple[list[str], float]], k: int) -> dict[str, float]:
    """Weighted reciprocal rank fusion.

    Each (ranking, weight) pair adds ``weight / (k + rank)`` (rank from 1) to an id's score.
    """
    scores: dict[str, float] = {}
    for ranked, weight in ranked_lists:
        for rank, item in enumerate(ranked, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return scores


class SourceState(BaseModel):
    """What the last committed run of one source left for the next one."""

    cursor: Any = Field(None, description="Largest updated-since value seen; JSON (datetimes as ISO strings).")
    cursor_is_datetime: bool = Field(False, description="Whether the cursor is an ISO datetime to bind as one.")
    last_success: float = Field(0, description="Unix time of the last committed run.")
    last_full_sync: float = Field(0, description="Unix time of the last run that saw every record.")
    documents: int = Field(0, description="Documents of this source in the knowledge base.")
    rejected: int = Field(0, description="Records the last committed run rejected (invalid; see the job's report).")


class TenantState(BaseModel):
    """A tenant's committed generation and its sources' state, written in one upsert."""

    generation: int = 0
    committed_at: float = 0
    sources: dict[str, SourceState] = Field(default_factory=dict)


class LiveChunk(BaseModel):
    """A visible chunk's identity, for diffing a source against new documents."""

    id: str
    doc_id: str


class MilvusKnowledgeStore:
    """The knowledge-chunk collection in Milvus (Lite file or server)."""

    def __init__(self, config: RetrieverConfig, *, dimension: int, has_sparse: bool, token: str | None = None) -> None:
        from pymilvus import MilvusClient

        self._config = config
        self._collection = config.collection
        self._state_collection = f"{config.collection}_state"
        self._has_sparse = has_sparse
        # tenant -> (committed generation, when it was read): saves a state read per search.
        self._generations: dict[str, tuple[int, float]] = {}
        if config.is_lite:
            Path(config.milvus_uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MilvusClient(uri=config.milvus_uri, token=token or "", timeout=config.timeout_s)
            ensure_chunk_collection(self._client, config, dimension=dimension, has_sparse=has_sparse)
            ensure_state_collection(self._client, self._state_collection)
            self._lite = _lite_database(config.milvus_uri) if config.is_lite else None
        except KnowledgeBaseUnavailableError:
            raise
        except Exception as err:
            raise KnowledgeBaseUnavailableError(f"Milvus at {config.milvus_uri} is unavailable: {err}") from err

    # -- sync runs ------------------------------------------------------------------------

    def tenant_state(self, tenant: str) -> TenantState:
        """The tenant's committed generation and source cursors (all zero before the first run)."""
        rows = self._call(
            "state read",
            lambda: self._client.get(self._state_collection, ids=[tenant], output_fields=["state"]),
        )
        return TenantState.model_validate(rows[0]["state"]) if rows else TenantState()

    def begin(self, tenant: str) -> int:
        """Clean up after an unfinished run and return the generation of a new one.

        Rows an unfinished run staged are deleted, rows it retired are live again, and rows
        retired by committed runs (left if a run died right after its commit) are deleted.
        """
        committed = self.tenant_state(tenant).generation
        scope = tenant_filter(tenant)
        self._delete_where(f"{scope} and gen_from > {committed}")
        self._delete_where(f"{scope} and gen_to <= {committed}")
        unretire = self._ids(f"{scope} and gen_to > {committed} and gen_to < {LIVE}")
        self._set_gen_to(unretire, LIVE)
        if unretire:
            logger.info("tenant %s: undid %d retirements of an unfinished run", tenant, len(unretire))
        return committed + 1

    def live_chunks(self, tenant: str, source: str) -> list[LiveChunk]:
        """Chunks of one source the assistant sees now."""
        state = self.tenant_state(tenant)
        expr = f"{self._visible(tenant, state.generation)} and source == {quote(source)}"
        return [LiveChunk(id=r["id"], doc_id=r["doc_id"]) for r in self._rows(expr, ["id", "doc_id"])]

    def stage(self, chunks: list[KnowledgeChunk], embeddings: list[Embedding], generation: int) -> None:
        """Write new chunk versions, invisible until ``generation`` commits."""
        rows: list[dict[str, Any]] = []
        for chunk, emb in zip(chunks, embeddings, strict=True):
            row: dict[str, Any] = chunk.model_dump()
            row.update(gen_from=generation, gen_to=LIVE)
            row[DENSE_FIELD] = emb.dense
            if self._has_sparse:
                # Milvus rejects empty sparse rows; a text of stop words can give one.
                row[SPARSE_FIELD] = emb.sparse or {0: 0.0}
            rows.append(row)
        for start in range(0, len(rows), _WRITE_BATCH):
            batch = rows[start : start + _WRITE_BATCH]
            self._call("insert", partial(self._client.upsert, self._collection, batch))

    def retire(self, ids: list[str], generation: int) -> None:
        """Mark chunks as replaced by ``generation``; they stay visible until it commits."""
        self._set_gen_to(ids, generation)

    def commit(
        self,
        tenant: str,
        generation: int,
        state: TenantState,
        *,
        data_changed: bool = True,
        visibility_timeout_s: float = 60,
    ) -> None:
        """Make ``generation`` the one searches see, with the sources' new state, then drop retired rows.

        With ``data_changed`` False the run staged and retired nothing: only the state
        (cursors, times) is written and the generation stays, so caches keyed by it hold.

        Raises:
            ConflictError: another run committed since this one began; nothing changed.
            KnowledgeBaseUnavailableError: Milvus failed.

        """
        if data_changed:
            self._call("flush", lambda: self._client.flush(self._collection))
            self._wait_visible(tenant, generation, visibility_timeout_s)
        else:
            generation -= 1
        current = self.tenant_state(tenant).generation
        if current != generation - data_changed:
            raise ConflictError(
                f"tenant {tenant}: another sync committed generation {current} while this run prepared {generation}; "
                "run the sync again"
            )
        state = state.model_copy(update={"generation": generation, "committed_at": time.time()})
        row = {"tenant": tenant, "state": state.model_dump(mode="json"), "unused_vector": [0.0, 0.0]}
        self._call("commit", lambda: self._client.upsert(self._state_collection, [row]))
        self._call("flush", lambda: self._client.flush(self._state_collection))
        self._generations[tenant] = (generation, time.monotonic())
        if data_changed and not self._config.is_lite:
            # Other processes' searches may use the previous generation for up to
            # generation_cache_s: its retired rows stay until they have all moved on. A Lite
            # file has one process, whose searches switched above.
            time.sleep(2 * self._config.generation_cache_s)
        scope = tenant_filter(tenant)
        # After the commit these rows are invisible; if this fails, the next begin() drops them.
        self._delete_where(f"{scope} and gen_to <= {generation}")

    def _wait_visible(self, tenant: str, generation: int, timeout_s: float) -> None:
        """Wait until reads see every row the run staged, so the commit never exposes a partial run.

        A Milvus server reads with bounded staleness; Milvus Lite sees writes at once.
        """
        expr = f"{tenant_filter(tenant)} and gen_from == {generation}"
        expected = self._count(expr, consistency_level="Strong")
        deadline = time.monotonic() + timeout_s
        while self._count(expr) < expected:
            if time.monotonic() > deadline:
                raise KnowledgeBaseUnavailableError(f"Milvus did not show the staged rows within {timeout_s:.0f}s")
            time.sleep(0.2)

    def _visible(self, tenant: str, generation: int) -> str:
        return f"{tenant_filter(tenant)} and gen_from <= {generation} and gen_to > {generation}"

    def _set_gen_to(self, ids: list[str], generation: int) -> None:
        for start in range(0, len(ids), _WRITE_BATCH):
            rows = [{"id": i, "gen_to": generation} for i in ids[start : start + _WRITE_BATCH]]
            self._call("update", partial(self._client.upsert, self._collection, rows, partial_update=True))

    def _delete_where(self, expr: str) -> None:
        self._call("delete", lambda: self._client.delete(self._collection, filter=expr))

    def _count(self, expr: str, **kwargs: Any) -> int:
        rows = self._call(
            "count", lambda: self._client.query(self._collection, filter=expr, output_fields=["count(*)"], **kwargs)
        )
        return int(rows[0]["count(*)"])

    def _ids(self, expr: str) -> list[str]:
        return [row["id"] for row in self._rows(expr, ["id"])]

    def _rows(self, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        """All rows matching ``expr``.

        One query returns at most 16384 rows; beyond that the query iterator pages through
        (on Milvus Lite it logs a harmless error while it sets up its timestamp).
        """
        total = self._count(expr)
        if total <= _QUERY_LIMIT:
            return self._call(
                "query", lambda: self._client.query(self._collection, filter=expr, output_fields=fields, limit=total)
            )

        def read() -> list[dict[str, Any]]:
            iterator = self._client.query_iterator(
                self._collection, batch_size=_ITERATOR_BATCH, filter=expr, output_fields=fields
            )
            rows: list[dict[str, Any]] = []
            try:
                while batch := iterator.next():
                    rows.extend(batch)
            finally:
                iterator.close()
            return rows

        return self._call("query", read)

    # -- reads ----------------------------------------------------------------------------

    def search(self, tenant: str, query: str, embedding: Embedding, top_k: int) -> SearchResult:
        """Hybrid search within the chunks of the tenant's committed generation.

        Returns:
            Up to ``top_k`` hits ordered by fused RRF score, each with its per-signal scores,
            and the similarities of the dense signal's own candidates.

        Raises:
            KnowledgeBaseUnavailableError: Milvus failed; never hidden as an empty result.

        """
        expr = self._visible(tenant, self._search_generation(tenant))
        limit = max(self._config.candidates_per_signal, top_k)
        signals: dict[str, list[dict[str, Any]]] = {
            "dense": self._search_field(DENSE_FIELD, [embedding.dense], "COSINE", expr, limit),
        }
        if self._has_sparse and embedding.sparse:
            signals["sparse"] = self._search_field(SPARSE_FIELD, [embedding.sparse], "IP", expr, limit)
        if self._config.enable_bm25 and query.strip():
            signals["bm25"] = self._search_field(BM25_FIELD, [query], "BM25", expr, limit)

        entities: dict[str, dict[str, Any]] = {}
        per_signal: dict[str, dict[str, float]] = {}
        for signal, hits in signals.items():
            per_signal[signal] = {}
            for hit in hits:
                entity = hit["entity"]
                if entity.get("tenant") != tenant:  # defence in depth: the filter must hold
                    raise KnowledgeBaseUnavailableError("Milvus returned a chunk outside the tenant filter")
                entities[entity["id"]] = entity
                # Milvus Lite returns BM25 scores negated; BM25 scores are never negative.
                score = abs(hit["distance"]) if signal == "bm25" else hit["distance"]
                per_signal[signal][entity["id"]] = float(score)
        weights = self._config.signal_weights
        # A signal's equal scores are ranked by chunk id: Milvus leaves their order open (its
        # engine and its gRPC server give tied hits in different orders), and a rank decides an
        # RRF score. Equal fused scores keep the dense signal's order (the sort is stable, and
        # rrf_fuse meets the dense candidates first).
        fused = rrf_fuse(
            ((_best_first(scores), weights.get(signal, 1.0)) for signal, scores in per_signal.items()),  # type: ignore[call-overload]
            self._config.rrf_k,
        )
        best = sorted(fused, key=fused.__getitem__, reverse=True)[:top_k]
        fused_hits = [
            RetrievedChunk(
                chunk=KnowledgeChunk(**{f: entities[cid][f] for f in SCALAR_FIELDS}),
                score=round(fused[cid], 6),
                dense_score=per_signal["dense"].get(cid),
                sparse_score=per_signal.get("sparse", {}).get(cid),
                bm25_score=per_signal.get("bm25", {}).get(cid),
            )
            for cid in best
        ]
        return SearchResult(hits=fused_hits, dense_candidates=sorted(per_signal["dense"].values(), reverse=True))

    def _search_generation(self, tenant: str) -> int:
        """The tenant's committed generation, read again once ``generation_cache_s`` has passed."""
        now = time.monotonic()
        cached = self._generations.get(tenant)
        if cached is not None and now - cached[1] < self._config.generation_cache_s:
            return cached[0]
        generation = self.tenant_state(tenant).generation
        self._generations[tenant] = (generation, now)
        return generation

    def _search_field(self, field: str, data: list[Any], metric: str, expr: str, limit: int) -> list[dict[str, Any]]:
        lite = self._lite  # read once: close() may clear it while this runs in a worker thread

        def search() -> Any:
            if lite is not None:
                # Milvus Lite's own engine, in this process: the same search its gRPC server
                # would run for pymilvus, without the request and the hits crossing gRPC on
                # loopback, encoded and decoded both ways (benchmarks/README.md, "Retrieval").
                # An in-process call does not wait on a network, so timeout_s has no part here.
                hits = lite.get_collection(self._collection).search(
                    data, top_k=limit, metric_type=metric, expr=expr, output_fields=SCALAR_FIELDS, anns_field=field
                )
                # The engine gives the primary key beside the entity; pymilvus puts it in.
                return [[{"distance": h["distance"], "entity": h["entity"] | {"id": h["id"]}} for h in q] for q in hits]
            return self._client.search(
                self._collection,
                data=data,
                filter=expr,
                limit=limit,
                anns_field=field,
                search_params={"metric_type": metric},
                output_fields=SCALAR_FIELDS,
                timeout=self._config.timeout_s,
            )

        result = self._call(f"search {field}", search)
        return list(result[0]) if result else []

    def ping(self) -> None:
        """Raise when Milvus does not answer."""
        self._call("describe", lambda: self._client.describe_collection(self._collection))

    def close(self) -> None:
        """Release the client and, for Milvus Lite, the in-process server holding the file lock."""
        self._lite = None
        try:
            self._client.close()
            if self._config.is_lite:
                # pymilvus keeps the Lite server running until process exit otherwise, so
                # another process (the app after a sync, or vice versa) could not open the file.
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self._config.milvus_uri)
        except Exception as err:  # closing a dead connection must not mask the caller's error
            logger.warning("closing Milvus client failed: %s", err)

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except Exception as err:
            raise KnowledgeBaseUnavailableError(f"Milvus {what} failed: {type(err).__name__}: {err}") from err


def _best_first(scores: dict[str, float]) -> list[str]:
    """A signal's ids by score, highest first; equal scores by id."""
    return sorted(scores, key=lambda cid: (-scores[cid], cid))


def _lite_database(uri: str) -> Any:
    """The Milvus Lite database pymilvus serves a Lite file from, in this process.

    pymilvus starts Milvus Lite's gRPC server in a thread of this process for a ``.db`` URI
    and keeps it, with the database it serves, in Milvus Lite's server manager (one per file;
    ``milvus_lite.server_manager``, milvus-lite 3.2.2, whose registry has no public getter).
    Searches call that database directly; writes still go through pymilvus, to the same
    database, so a search sees them as soon as pymilvus returns.
    """
    from milvus_lite.server_manager import server_manager_instance

    _server, database, _port = server_manager_instance._servers[os.path.abspath(uri)]
    return database
