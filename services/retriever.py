"""Retriever deployment: tenant-scoped hybrid search over Milvus, and in-app knowledge ingest.

The collection, its atomic sync runs and the hybrid search live in
:class:`~services.knowledge.store.MilvusKnowledgeStore`; this deployment holds one store
per replica. It also runs the knowledge-sync pipeline for documents sent to the running
app, because a Milvus Lite file admits one process: the app's.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from services.config import ChunkingConfig, ObservabilityConfig, RetrieverConfig, ServiceSettings
from services.knowledge.lease import InProcessSyncLease, RedisSyncLease, SyncLease
from services.knowledge.store import MilvusKnowledgeStore, tenant_filter
from services.observability.logs import configure_replica_logging
from services.observability.metrics import Metrics, RayMetrics, names_for
from services.observability.tracing import tracer
from services.schemas import Embedding, SearchResult

if TYPE_CHECKING:
    from services.knowledge.ingest import SourceBatch, SyncReport

logger = logging.getLogger(__name__)


class HandleEmbeddingBackend:
    """An :class:`~services.embedder.EmbeddingBackend` that calls the Embedder deployment.

    Blocking by design: the sync pipeline runs in a worker thread, never on the event loop.
    Each call is made on the replica's event loop (``loop``) and waited for from the thread:
    under Ray Serve's throughput mode a handle routes on its caller's loop, so a call made
    from a thread that has none fails.
    """

    def __init__(self, handle: DeploymentHandle, info: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self._handle = handle
        self._loop = loop
        self.dimension: int = info["dimension"]
        self.has_sparse: bool = info["has_sparse"]
        self.max_length: int = info["max_length"]

    def encode(self, texts: list[str], kind: Literal["query", "passage"]) -> list[Embedding]:
        """Embed through the deployment, waiting for the result."""
        result: list[Embedding] = self._on_loop(lambda: self._handle.embed.remote(texts, kind))
        return result

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Count tokens with the deployment's tokenizer, waiting for the result."""
        result: list[int] = self._on_loop(lambda: self._handle.count_tokens.remote(texts))
        return result

    def _on_loop(self, call: Callable[[], Any]) -> Any:
        async def made_there() -> Any:
            return await call()

        return asyncio.run_coroutine_threadsafe(made_there(), self._loop).result()


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
        sync_lease: SyncLease | None = None,
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
        self._lease = sync_lease or open_sync_lease(config)
        self._runs: set[asyncio.Task[SyncReport]] = set()  # syncs under way, kept to their end

    async def search(self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None) -> SearchResult:
        """Return the tenant's best chunks for ``query``, best first, and the dense signal's own candidates.

        ``embedding`` is the query's embedding when the caller computed it already;
        otherwise the Embedder deployment computes it.
        """
        if embedding is None:
            [embedding] = await self._embedder.embed.remote([query], "query")
        with tracer().start_as_current_span("retriever.search", attributes={"tenant": tenant, "top_k": top_k}) as span:
            started = time.monotonic()
            result = await asyncio.to_thread(self._store.search, tenant, query, embedding, top_k)
            self._metrics.observe("cs_retriever_search_seconds", time.monotonic() - started, {"tenant": tenant})
            span.set_attribute("hits", len(result.hits))
            return result

    async def ingest(
        self,
        tenant: str,
        source: str,
        batch: SourceBatch,
        chunking: ChunkingConfig | None = None,
        max_delete_fraction: float | None = None,
    ) -> dict[str, Any]:
        """Apply one source's batch to a tenant's knowledge base through this replica's connection.

        The knowledge-sync pipeline runs here, unchanged, so a running app (which holds
        the only connection a Milvus Lite file allows) takes new policies without a
        restart, atomically. Passages are embedded by the Embedder deployment.

        One run per tenant at a time, across replicas: the run holds the tenant's sync
        lease from its first read to its commit; a second is refused at once (409) and
        changes nothing. A run whose caller goes away (a cancelled request, a timeout) goes
        on to its end and keeps the lease until then, because a run cut short in its worker
        thread could not be stopped anyway.

        Returns:
            The run's :class:`~services.knowledge.ingest.SyncReport` as a dict.

        Raises:
            ConflictError: another run of the tenant is under way, or would delete too much.

        """
        from services.knowledge.ingest import sync_source

        tenant_filter(tenant)  # refuse odd tenant ids before any work
        info = await self._embedder.info.remote()
        embedder = HandleEmbeddingBackend(self._embedder, info, asyncio.get_running_loop())

        async def run() -> SyncReport:
            async with self._lease.hold(tenant):
                return await asyncio.to_thread(
                    sync_source, self._store, embedder, tenant, source, batch, chunking or ChunkingConfig(),
                    max_delete_fraction=max_delete_fraction,
                )  # fmt: skip

        # Serve cancels every call a cancelled request made, the Embedder calls of this run's
        # thread included: in a context of its own the run is nobody's child, so it is never cut short.
        task = asyncio.create_task(run(), context=contextvars.Context())
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        report = await asyncio.shield(task)
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


def open_sync_lease(config: RetrieverConfig) -> SyncLease:
    """The configured sync lease; Redis needs a URL (``sync_lease.redis_url`` or ``CS_REDIS_URL``).

    Raises:
        ValueError: Redis is chosen but no URL is given.

    """
    if config.sync_lease.backend == "memory":
        return InProcessSyncLease()
    secret = ServiceSettings().redis_url
    url = secret.get_secret_value() if secret else config.sync_lease.redis_url
    if not url:
        raise ValueError("sync_lease.backend is redis but neither sync_lease.redis_url nor CS_REDIS_URL is set")
    return RedisSyncLease(url, config.sync_lease.ttl_s)


def build_retriever(
    config: RetrieverConfig, embedder: Application, observability: ObservabilityConfig | None = None
) -> Application:
    """Bind the Retriever deployment to the embedder."""
    if config.is_lite and config.deployment.num_replicas != 1:
        # Milvus Lite allows one process per database folder (DataDirLockedError).
        raise ValueError("a Milvus Lite file supports exactly one retriever replica; use a Milvus server to scale")
    deployment = serve.deployment(name="Retriever", **config.deployment.to_serve_options())(Retriever)
    return deployment.bind(config, embedder, observability or ObservabilityConfig())
