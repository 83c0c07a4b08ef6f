"""Retriever deployment: tenant-scoped hybrid search over Milvus.

:class:`MilvusKnowledgeStore` owns the collection (schema, indexes, upserts, search);
the knowledge-sync job uses it directly to write, the deployment uses it to read.

Hybrid search runs one search per signal (dense, learned sparse when the embedder
gives it, BM25 on the text when enabled), each filtered to the tenant, and fuses the
ranked lists with reciprocal rank fusion. Fusion happens here rather than in Milvus'
``hybrid_search`` because the orchestrator needs each signal's own score: RRF scores
are rank-based and cannot tell a relevant first hit from an irrelevant one, while the
dense cosine similarity can. (Milvus Lite also ignores ``hybrid_search(filter=...)``.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from services.config import TENANT_PATTERN, RetrieverConfig, ServiceSettings
from services.errors import InvalidRequestError, KnowledgeBaseUnavailableError
from services.schemas import Embedding, KnowledgeChunk, RetrievedChunk

if TYPE_CHECKING:
    from knowledge_sync.documents import KnowledgeDocument

logger = logging.getLogger(__name__)

DENSE_FIELD = "dense_vector"
SPARSE_FIELD = "sparse_vector"
BM25_FIELD = "bm25_vector"
SCALAR_FIELDS = [
    "id",
    "tenant",
    "source",
    "doc_id",
    "chunk_no",
    "title",
    "text",
    "category",
    "updated_at",
    "content_hash",
]
MAX_TEXT_CHARS = 8192


def quote(value: str) -> str:
    """Quote a string literal for a Milvus filter expression."""
    return json.dumps(value, ensure_ascii=False)


_TENANT_ID = re.compile(TENANT_PATTERN)


def tenant_filter(tenant: str) -> str:
    """Filter expression scoping a search to one tenant; refuses ids that are not plain names."""
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


class MilvusKnowledgeStore:
    """The knowledge-chunk collection in Milvus (Lite file or server)."""

    def __init__(self, config: RetrieverConfig, *, dimension: int, has_sparse: bool, token: str | None = None) -> None:
        from pymilvus import MilvusClient

        self._config = config
        self._collection = config.collection
        self._has_sparse = has_sparse
        if config.is_lite:
            Path(config.milvus_uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MilvusClient(uri=config.milvus_uri, token=token or "", timeout=config.timeout_s)
            self._ensure_collection(dimension)
        except KnowledgeBaseUnavailableError:
            raise
        except Exception as err:
            raise KnowledgeBaseUnavailableError(f"Milvus at {config.milvus_uri} is unavailable: {err}") from err

    # -- schema ---------------------------------------------------------------------------

    def _ensure_collection(self, dimension: int) -> None:
        from pymilvus import DataType, Function, FunctionType

        client, name = self._client, self._collection
        if client.has_collection(name):
            self._check_existing(dimension)
            client.load_collection(name)
            return
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64)
        schema.add_field("source", DataType.VARCHAR, max_length=256)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=256)
        schema.add_field("chunk_no", DataType.INT64)
        schema.add_field("title", DataType.VARCHAR, max_length=1024)
        schema.add_field(
            "text",
            DataType.VARCHAR,
            max_length=MAX_TEXT_CHARS * 4,  # bytes: a CJK character is 3 in UTF-8
            enable_analyzer=self._config.enable_bm25,
            analyzer_params=self._config.bm25_analyzer if self._config.enable_bm25 else None,
        )
        schema.add_field("category", DataType.VARCHAR, max_length=128)
        schema.add_field("updated_at", DataType.INT64)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field(DENSE_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
        index = client.prepare_index_params()
        index.add_index(DENSE_FIELD, index_type=self._config.dense_index_type, metric_type="COSINE")
        if self._has_sparse:
            schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
            index.add_index(SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        if self._config.enable_bm25:
            schema.add_field(BM25_FIELD, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name="text_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=[BM25_FIELD],
                )
            )
            index.add_index(BM25_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        client.create_collection(name, schema=schema, index_params=index)
        logger.info("created collection %s (dim %d, sparse %s)", name, dimension, self._has_sparse)

    def _check_existing(self, dimension: int) -> None:
        fields = {f["name"]: f for f in self._client.describe_collection(self._collection)["fields"]}
        existing_dim = int(fields.get(DENSE_FIELD, {}).get("params", {}).get("dim", -1))
        if existing_dim != dimension:
            raise KnowledgeBaseUnavailableError(
                f"collection {self._collection} holds {existing_dim}-dim vectors but the embedder gives {dimension}; "
                "use another collection name or re-sync the knowledge base"
            )
        for field, wanted in ((SPARSE_FIELD, self._has_sparse), (BM25_FIELD, self._config.enable_bm25)):
            if wanted and field not in fields:
                raise KnowledgeBaseUnavailableError(
                    f"collection {self._collection} lacks {field}; it was created with other settings"
                )

    # -- writes ---------------------------------------------------------------------------

    def upsert(self, chunks: list[KnowledgeChunk], embeddings: list[Embedding]) -> None:
        """Insert or replace chunks with their embeddings."""
        rows: list[dict[str, Any]] = []
        for chunk, emb in zip(chunks, embeddings, strict=True):
            row: dict[str, Any] = chunk.model_dump()
            row[DENSE_FIELD] = emb.dense
            if self._has_sparse:
                # Milvus rejects empty sparse rows; a text of stop words can give one.
                row[SPARSE_FIELD] = emb.sparse or {0: 0.0}
            rows.append(row)
        if rows:
            self._call("upsert", lambda: self._client.upsert(self._collection, rows))
            self._call("flush", lambda: self._client.flush(self._collection))

    def content_hashes(self, tenant: str, source: str) -> dict[str, str]:
        """Ids and content hashes of one tenant's chunks from one source."""
        expr = f"{tenant_filter(tenant)} and source == {quote(source)}"
        rows = self._call(
            "query",
            lambda: self._client.query(
                self._collection, filter=expr, output_fields=["id", "content_hash"], limit=16384
            ),
        )
        return {row["id"]: row["content_hash"] for row in rows}

    def delete_ids(self, ids: list[str]) -> None:
        """Delete chunks by id."""
        if ids:
            self._call("delete", lambda: self._client.delete(self._collection, ids=ids))
            self._call("flush", lambda: self._client.flush(self._collection))

    # -- reads ----------------------------------------------------------------------------

    def search(self, tenant: str, query: str, embedding: Embedding, top_k: int) -> list[RetrievedChunk]:
        """Hybrid search within one tenant's chunks.

        Returns:
            Up to ``top_k`` hits ordered by fused RRF score, each with its per-signal scores.

        Raises:
            KnowledgeBaseUnavailableError: Milvus failed; never hidden as an empty result.

        """
        expr = tenant_filter(tenant)
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
        fused = rrf_fuse(
            ((list(scores), weights.get(signal, 1.0)) for signal, scores in per_signal.items()),  # type: ignore[call-overload]
            self._config.rrf_k,
        )
        best = sorted(fused, key=fused.__getitem__, reverse=True)[:top_k]
        return [
            RetrievedChunk(
                chunk=KnowledgeChunk(**{f: entities[cid][f] for f in SCALAR_FIELDS}),
                score=round(fused[cid], 6),
                dense_score=per_signal["dense"].get(cid),
                sparse_score=per_signal.get("sparse", {}).get(cid),
                bm25_score=per_signal.get("bm25", {}).get(cid),
            )
            for cid in best
        ]

    def _search_field(self, field: str, data: list[Any], metric: str, expr: str, limit: int) -> list[dict[str, Any]]:
        result = self._call(
            f"search {field}",
            lambda: self._client.search(
                self._collection,
                data=data,
                filter=expr,
                limit=limit,
                anns_field=field,
                search_params={"metric_type": metric},
                output_fields=SCALAR_FIELDS,
                timeout=self._config.timeout_s,
            ),
        )
        return list(result[0]) if result else []

    def ping(self) -> None:
        """Raise when Milvus does not answer."""
        self._call("describe", lambda: self._client.describe_collection(self._collection))

    def close(self) -> None:
        """Release the client and, for Milvus Lite, the in-process server holding the file lock."""
        try:
            self._client.close()
            if self._config.is_lite:
                # pymilvus keeps the Lite server running until process exit otherwise, so
                # another process (the app after a sync, or vice versa) could not open the file.
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self._config.milvus_uri)
        except Exception as err:  # closing a dead connection must not mask the caller's error
            logger.warning("closing Milvus client failed: %s", err)

    def _call(self, what: str, call: Any) -> Any:
        try:
            return call()
        except Exception as err:
            raise KnowledgeBaseUnavailableError(f"Milvus {what} failed: {type(err).__name__}: {err}") from err


class HandleEmbeddingBackend:
    """An :class:`~services.embedder.EmbeddingBackend` that calls the Embedder deployment.

    Blocking by design: the sync pipeline runs in a worker thread, never on the event loop.
    """

    def __init__(self, handle: DeploymentHandle, info: dict[str, Any]) -> None:
        self._handle = handle
        self.dimension: int = info["dimension"]
        self.has_sparse: bool = info["has_sparse"]

    def encode(self, texts: list[str], kind: Literal["query", "passage"]) -> list[Embedding]:
        """Embed through the deployment, waiting for the result."""
        result: list[Embedding] = self._handle.embed.remote(texts, kind).result()
        return result


class Retriever:
    """Ray Serve deployment: embeds the query, searches the tenant's chunks."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        config: RetrieverConfig,
        embedder: DeploymentHandle,
        *,
        store: MilvusKnowledgeStore | None = None,
    ) -> None:
        self._embedder = embedder
        if store is None:
            info = await embedder.info.remote()
            token = ServiceSettings().milvus_token
            store = MilvusKnowledgeStore(
                config,
                dimension=info["dimension"],
                has_sparse=info["has_sparse"],
                token=token.get_secret_value() if token else None,
            )
        self._store = store

    async def search(
        self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None
    ) -> list[RetrievedChunk]:
        """Return the tenant's best chunks for ``query``, best first.

        ``embedding`` is the query's embedding when the caller computed it already;
        otherwise the Embedder deployment computes it.
        """
        if embedding is None:
            [embedding] = await self._embedder.embed.remote([query], "query")
        return await asyncio.to_thread(self._store.search, tenant, query, embedding, top_k)

    async def ingest(
        self, tenant: str, source: str, documents: list[KnowledgeDocument], max_chunk_chars: int = 800
    ) -> dict[str, int]:
        """Sync one source of a tenant's documents through this replica's Milvus connection.

        The knowledge-sync pipeline runs here, unchanged, so a running app (which holds
        the only connection a Milvus Lite file allows) can take new policies without a
        restart. Passages are embedded by the Embedder deployment.

        Returns:
            Counts: documents, chunks, embedded, unchanged, deleted.

        """
        from knowledge_sync.pipeline import sync_documents

        tenant_filter(tenant)  # refuse odd tenant ids before any work
        embedder = HandleEmbeddingBackend(self._embedder, await self._embedder.info.remote())
        report = await asyncio.to_thread(
            sync_documents, self._store, embedder, tenant, source, documents, max_chunk_chars=max_chunk_chars
        )
        return dataclasses.asdict(report)

    async def check_health(self) -> None:
        """Fail when Milvus does not answer."""
        await asyncio.to_thread(self._store.ping)

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


def build_retriever(config: RetrieverConfig, embedder: Application) -> Application:
    """Bind the Retriever deployment to the embedder."""
    if config.is_lite and config.deployment.num_replicas != 1:
        # Milvus Lite allows one process per database folder (DataDirLockedError).
        raise ValueError("a Milvus Lite file supports exactly one retriever replica; use a Milvus server to scale")
    deployment = serve.deployment(name="Retriever", **config.deployment.to_serve_options())(Retriever)
    return deployment.bind(config, embedder)
