"""Retriever deployment: tenant-scoped hybrid search over Milvus, and in-app knowledge ingest.

The collection, its atomic sync runs and the hybrid search live in
:class:`~services.knowledge.store.MilvusKnowledgeStore`; this deployment holds one store
per replica. It also runs the knowledge-sync pipeline for documents sent to the running
app, because a Milvus Lite file admits one process: the app's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from services.config import ChunkingConfig, ObservabilityConfig, RetrieverConfig, ServiceSettings
from services.knowledge.store import MilvusKnowledgeStore, tenant_filter
from services.observability.logs import configure_replica_logging
from services.observability.metrics import Metrics, RayMetrics, names_for
from services.observability.tracing import tracer
from services.schemas import Embedding, RetrievedChunk

if TYPE_CHECKING:
    from services.knowledge.ingest import SourceBatch

logger = logging.getLogger(__name__)


class HandleEmbeddingBackend:
    """An :class:`~services.embedder.EmbeddingBackend` that calls the Embedder deployment.

    Blocking by design: the sync pipeline runs in a worker thread, never on the event loop.
    """

    def __init__(self, handle: DeploymentHandle, info: dict[str, Any]) -> None:
        self._handle = handle
        self.dimension: int = info["dimension"]
        self.has_sparse: bool = info["has_sparse"]
        self.max_length: int = info["max_length"]

    def encode(self, texts: list[str], kind: Literal["query", "passage"]) -> list[Embedding]:
        """Embed through the deployment, waiting for the result."""
        result: list[Embedding] = self._handle.embed.remote(texts, kind).result()
        return result

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Count tokens with the deployment's tokenizer, waiting for the result."""
        result: list[int] = self._handle.count_tokens.remote(texts).result()
        return result


class Retriever:
    """Ray Serve deployment: embeds the query, searches the tenant's chunks."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        config: RetrieverConfig,
        embedder: DeploymentHandle,
        observability: ObservabilityConfig | None = None,
        *,
        store: MilvusKnowledgeStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        observability = observability or ObservabilityConfig()
        configure_replica_logging(observability.log_level, observability.log_format)
        self._metrics = metrics or RayMetrics(names_for("Retriever"))
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
        self._ingest_lock = asyncio.Lock()

    async def search(
        self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None
    ) -> list[RetrievedChunk]:
        """Return the tenant's best chunks for ``query``, best first.

        ``embedding`` is the query's embedding when the caller computed it already;
        otherwise the Embedder deployment computes it.
        """
        if embedding is None:
            [embedding] = await self._embedder.embed.remote([query], "query")
        with tracer().start_as_current_span("retriever.search", attributes={"tenant": tenant, "top_k": top_k}) as span:
            started = time.monotonic()
            hits = await asyncio.to_thread(self._store.search, tenant, query, embedding, top_k)
            self._metrics.observe("cs_retriever_search_seconds", time.monotonic() - started, {"tenant": tenant})
            span.set_attribute("hits", len(hits))
            return hits

    async def ingest(
        self, tenant: str, source: str, batch: SourceBatch, chunking: ChunkingConfig | None = None
    ) -> dict[str, Any]:
        """Apply one source's batch to a tenant's knowledge base through this replica's connection.

        The knowledge-sync pipeline runs here, unchanged, so a running app (which holds
        the only connection a Milvus Lite file allows) takes new policies without a
        restart, atomically. Passages are embedded by the Embedder deployment. Runs are
        serialized: the store's atomicity assumes one writer per tenant.

        Returns:
            The run's :class:`~services.knowledge.ingest.SyncReport` as a dict.

        """
        from services.knowledge.ingest import sync_source

        tenant_filter(tenant)  # refuse odd tenant ids before any work
        embedder = HandleEmbeddingBackend(self._embedder, await self._embedder.info.remote())
        async with self._ingest_lock:
            report = await asyncio.to_thread(
                sync_source, self._store, embedder, tenant, source, batch, chunking or ChunkingConfig()
            )
        for outcome in ("added", "updated", "deleted", "unchanged", "rejected"):
            tags = {"tenant": tenant, "source": source, "outcome": outcome}
            self._metrics.inc("cs_knowledge_ingest_records", tags, getattr(report, outcome))
        self._metrics.observe("cs_knowledge_ingest_seconds", report.seconds, {"tenant": tenant, "source": source})
        self._metrics.set("cs_knowledge_generation", report.generation, {"tenant": tenant})
        return report.model_dump()

    async def knowledge_state(self, tenant: str) -> dict[str, Any]:
        """The tenant's committed generation and per-source cursors."""
        tenant_filter(tenant)
        state = await asyncio.to_thread(self._store.tenant_state, tenant)
        return state.model_dump(mode="json")

    async def check_health(self) -> None:
        """Fail when Milvus does not answer."""
        await asyncio.to_thread(self._store.ping)

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


def build_retriever(
    config: RetrieverConfig, embedder: Application, observability: ObservabilityConfig | None = None
) -> Application:
    """Bind the Retriever deployment to the embedder."""
    if config.is_lite and config.deployment.num_replicas != 1:
        # Milvus Lite allows one process per database folder (DataDirLockedError).
        raise ValueError("a Milvus Lite file supports exactly one retriever replica; use a Milvus server to scale")
    deployment = serve.deployment(name="Retriever", **config.deployment.to_serve_options())(Retriever)
    return deployment.bind(config, embedder, observability or ObservabilityConfig())
