"""The chat's view of the other deployments: narrow protocols and their clients over Serve handles.

The pipeline depends on the protocols only, so it unit-tests without Ray; the clients bound
every call, turn a replica's crash or timeout into a 503 naming the dependency, and time
their stage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from opentelemetry import trace

from services.config import ChunkingConfig, SamplingConfig
from services.errors import (
    DeadlineExceededError,
    DependencyUnavailableError,
    OverloadedError,
    ServiceError,
    SyncOutcomeUnknownError,
)
from services.observability.metrics import Metrics
from services.observability.tracing import tracer
from services.schemas import ChatMessage, Embedding, GenerationChunk, GenerationRequest, SearchResult

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

    from services.knowledge.ingest import SourceBatch

logger = logging.getLogger(__name__)

T = TypeVar("T")

AdapterResolver = Callable[[str, str], str | None]
"""(tenant, session id) -> the adapter id the session uses now, or None."""


class KnowledgeSearch(Protocol):
    """Finds a tenant's knowledge chunks for a query."""

    async def search(self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None) -> SearchResult:
        """Best chunks first; ``embedding`` is the query's, when the caller has it already."""
        ...


class AnswerGenerator(Protocol):
    """Streams an answer to chat messages."""

    def stream(
        self,
        messages: list[ChatMessage],
        sampling: SamplingConfig,
        adapter: str | None,
        *,
        tools: list[dict[str, Any]] | None = None,
        json_schema: dict[str, Any] | None = None,
        tenant: str | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Chunks of text; the last carries the finish reason (and the tool calls, when tools were given).

        ``deadline`` (``time.monotonic()``) is when the whole request must be done: past it
        the stream ends with :class:`DeadlineExceededError` and the generation is stopped.
        """
        ...


class QueryEmbedder(Protocol):
    """Embeds queries (the Embedder deployment)."""

    async def embed(self, texts: list[str]) -> list[Embedding]:
        """Query embeddings (normalized dense, plus sparse for BGE-M3)."""
        ...


class PassageReranker(Protocol):
    """Scores passages against a question with a cross-encoder (the Embedder deployment's reranker)."""

    async def rerank(self, query: str, passages: list[str]) -> list[float]:
        """Relevance (0..1) of each passage to the query, in the passages' order."""
        ...


async def call_dependency(
    name: str,
    call: Callable[[], Awaitable[T]],
    timeout_s: float,
    on_timeout: Callable[[], ServiceError] | None = None,
) -> T:
    """Await a deployment call; timeouts and crashes become a 503 naming the dependency.

    ``on_timeout`` gives the error of a timeout instead, where it means more than an outage.
    """
    try:
        return await asyncio.wait_for(call(), timeout_s)
    except StopAsyncIteration:  # a stream ended normally
        raise
    except TimeoutError as err:
        if on_timeout is not None:
            raise on_timeout() from err
        raise DependencyUnavailableError(f"{name} did not answer within {timeout_s:g} s") from err
    except Exception as err:
        # Ray re-raises a replica's error as a RayTaskError whose `cause` is the original;
        # ours go on as they are (status and message intact), anything else is an outage.
        cause = getattr(err, "cause", err)
        if isinstance(cause, ServiceError):
            raise cause from None
        if _is_back_pressure(err):
            # Its queue is full (max_queued_requests): say so at once, rather than wait in line.
            raise OverloadedError(f"{name} is at capacity; try again shortly") from err
        # The type says what failed; Ray's own text (addresses, pids, tracebacks) only at DEBUG.
        logger.warning("%s failed (%s)", name, type(err).__name__)
        logger.debug("%s failed: %s", name, err)
        raise DependencyUnavailableError(f"{name} failed ({type(err).__name__})") from err


def _is_back_pressure(err: Exception) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(err, BackPressureError)


@contextmanager
def stage(metrics: Metrics, name: str, span_name: str, **attributes: Any) -> Iterator[Span]:
    """A pipeline stage: a span (current, so deployment calls nest under it) and its latency."""
    with tracer().start_as_current_span(span_name, attributes=attributes) as span:
        started = time.monotonic()
        yield span
        metrics.observe("cs_stage_seconds", time.monotonic() - started, {"stage": name})


class RetrieverClient:
    """:class:`KnowledgeSearch` and knowledge ingest over the Retriever deployment."""

    def __init__(
        self,
        handle: DeploymentHandle,
        timeout_s: float,
        ingest_timeout_s: float,
        metrics: Metrics | None = None,
        generation_cache_s: float = 0.0,
    ) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        self._ingest_timeout_s = ingest_timeout_s
        self._metrics = metrics or Metrics()
        self._generation_cache_s = generation_cache_s
        self._generations: dict[str, tuple[int, float]] = {}  # tenant -> (generation, when read)

    async def ingest(
        self,
        tenant: str,
        source: str,
        batch: SourceBatch,
        chunking: ChunkingConfig | None,
        max_delete_fraction: float | None = None,
    ) -> dict[str, Any]:
        """Sync one source's batch in the Retriever deployment (atomic; see the knowledge store).

        Raises:
            SyncOutcomeUnknownError: it did not finish in time; the run goes on and may still commit.

        """

        def unknown() -> ServiceError:
            return SyncOutcomeUnknownError(
                f"the sync of {tenant}/{source} did not finish within {self._ingest_timeout_s:g} s; it goes on in the "
                f"Retriever and may still commit: see GET /admin/knowledge/{tenant} before sending it again"
            )

        try:
            return await call_dependency(
                "knowledge retriever",
                lambda: self._handle.ingest.remote(tenant, source, batch, chunking, max_delete_fraction),
                self._ingest_timeout_s,
                on_timeout=unknown,
            )
        finally:
            self._generations.pop(tenant, None)  # committed or not, read it afresh

    async def generation(self, tenant: str) -> int:
        """The tenant's committed knowledge generation (the answer cache's knowledge version).

        Reused for ``generation_cache_s``: a sync through another replica or the sync job is
        seen within that time, one through this replica at once.
        """
        now = time.monotonic()
        cached = self._generations.get(tenant)
        if cached is not None and now - cached[1] < self._generation_cache_s:
            return cached[0]
        generation = int((await self.state(tenant))["generation"])
        self._generations[tenant] = (generation, now)
        return generation

    async def state(self, tenant: str) -> dict[str, Any]:
        """The tenant's committed knowledge generation and source cursors."""
        return await call_dependency(
            "knowledge retriever", lambda: self._handle.knowledge_state.remote(tenant), self._timeout_s
        )

    async def search(self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None) -> SearchResult:
        """Search through the Retriever deployment."""
        with stage(self._metrics, "retrieve", "cs.retrieve", tenant=tenant, top_k=top_k):
            return await call_dependency(
                "knowledge retriever",
                lambda: self._handle.search.remote(tenant, query, top_k, embedding),
                self._timeout_s,
            )


class LLMClient:
    """:class:`AnswerGenerator` over the LLM deployment (adapter chosen by multiplexed id)."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, metrics: Metrics | None = None) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        self._metrics = metrics or Metrics()

    async def stream(
        self,
        messages: list[ChatMessage],
        sampling: SamplingConfig,
        adapter: str | None,
        *,
        tools: list[dict[str, Any]] | None = None,
        json_schema: dict[str, Any] | None = None,
        tenant: str | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream from the LLM deployment; each chunk must arrive within the timeout, all by ``deadline``.

        However the stream ends early (a timeout, the deadline, an error, or the caller
        closing it: a withheld answer, a client gone), the deployment call is cancelled, so
        the engine stops generating instead of running on to ``max_tokens``.
        """
        handle = self._handle.options(stream=True, multiplexed_model_id=adapter or "")
        request = GenerationRequest(
            messages=messages, sampling=sampling, tools=tools, json_schema=json_schema, tenant=tenant
        )
        # The span is current only while the call is made (Serve copies the context then):
        # this generator may be resumed from another task, where a context attached here
        # could not be detached.
        attributes: dict[str, Any] = {"adapter": adapter or "base", "tools": bool(tools)}
        attributes["structured"] = json_schema is not None
        span = tracer().start_span("cs.generate", attributes=attributes)
        started = time.monotonic()
        chunks: DeploymentResponseGenerator | None = None
        finished = False
        try:
            with trace.use_span(span, end_on_exit=False):
                chunks = cast("DeploymentResponseGenerator", handle.generate.remote(request))
            iterator = chunks.__aiter__()
            first = True
            while True:
                try:
                    chunk = await self._next(iterator, deadline)
                except StopAsyncIteration:
                    finished = True
                    self._metrics.observe("cs_stage_seconds", time.monotonic() - started, {"stage": "generate"})
                    return
                if first:
                    self._metrics.observe("cs_stage_seconds", time.monotonic() - started, {"stage": "first_token"})
                    first = False
                yield chunk
        except Exception as err:
            span.record_exception(err)
            span.set_status(trace.StatusCode.ERROR, str(err))
            raise
        finally:
            if chunks is not None and not finished:
                chunks.cancel()
            span.end()

    async def _next(self, iterator: AsyncIterator[GenerationChunk], deadline: float | None) -> GenerationChunk:
        """The next chunk, within the per-chunk timeout and the request's deadline."""
        if deadline is None or deadline - time.monotonic() >= self._timeout_s:
            return await call_dependency("LLM", iterator.__anext__, self._timeout_s)
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("the answer was not complete within the request's time limit")
        try:
            return await call_dependency("LLM", iterator.__anext__, left)
        except DependencyUnavailableError as err:
            if time.monotonic() >= deadline:
                raise DeadlineExceededError("the answer was not complete within the request's time limit") from err
            raise


class EmbedderClient:
    """:class:`QueryEmbedder` and :class:`PassageReranker` over the Embedder deployment."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, metrics: Metrics | None = None) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        self._metrics = metrics or Metrics()

    async def embed(self, texts: list[str]) -> list[Embedding]:
        """Embed queries through the Embedder deployment."""
        with stage(self._metrics, "embed", "cs.embed", texts=len(texts)):
            return await call_dependency("embedder", lambda: self._handle.embed.remote(texts, "query"), self._timeout_s)

    async def rerank(self, query: str, passages: list[str]) -> list[float]:
        """Score passages with the Embedder deployment's cross-encoder."""
        with stage(self._metrics, "rerank", "cs.rerank", passages=len(passages)):
            return await call_dependency(
                "reranker", lambda: self._handle.rerank.remote(query, passages), self._timeout_s
            )
