"""Orchestrator deployment: the FastAPI ingress and the dialogue pipeline.

Pipeline per message: load the session, retrieve the tenant's knowledge, decide
whether it is relevant enough to answer from (otherwise reply with the fallback
sentence, confidence 0), build the prompt, generate with the tenant's adapter,
save the turn. Retrieval and generation sit behind two small protocols so the
pipeline unit-tests without Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from opentelemetry import trace
from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from services.adapters.admin import AdapterAdmin
from services.adapters.registry import AdapterRegistry
from services.api import create_api
from services.api.auth import ApiKeyAuth, admin_digests
from services.api.models import ChatReply, ChatRequest, FeedbackRequest, Source, Usage
from services.chat.answer_cache import AnswerCache, cache_key, open_answer_cache
from services.chat.grounding import Grounding, build_messages, ground, sources_of
from services.chat.intents import (
    CHIT_CHAT,
    COMPLAINT,
    HUMAN_AGENT,
    OUT_OF_SCOPE,
    SENSITIVE,
    Classification,
    IntentClassifier,
)
from services.chat.structured_reply import (
    CHARS_PER_TOKEN,
    REPLY_INSTRUCTION,
    ReplyStreamDecoder,
    combined_confidence,
    reply_schema,
)
from services.config import (
    ChunkingConfig,
    LLMConfig,
    ObservabilityConfig,
    OrchestratorConfig,
    SamplingConfig,
    ServiceSettings,
    TenantConfig,
    ToolConfig,
)
from services.errors import (
    DependencyUnavailableError,
    GenerationError,
    InvalidRequestError,
    NotFoundError,
    ServiceError,
)
from services.observability.logs import configure_replica_logging
from services.observability.metrics import Metrics, RayMetrics, names_for
from services.observability.tracing import tracer
from services.schemas import ChatMessage, Embedding, GenerationChunk, GenerationRequest, RetrievedChunk, ToolCall
from services.sessions import (
    InProcessSessionMemory,
    RedisSessionMemory,
    SessionMemory,
    Turn,
    open_session_memory,
    within_budget,
)
from services.tools import ToolRunner, forced_call_schema, function_spec

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from services.knowledge.ingest import SourceBatch

T = TypeVar("T")
logger = logging.getLogger(__name__)


class KnowledgeSearch(Protocol):
    """Finds a tenant's knowledge chunks for a query."""

    async def search(
        self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None
    ) -> list[RetrievedChunk]:
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
    ) -> AsyncIterator[GenerationChunk]:
        """Chunks of text; the last carries the finish reason (and the tool calls, when tools were given)."""
        ...


async def call_dependency(name: str, call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Await a deployment call; timeouts and crashes become a 503 naming the dependency."""
    try:
        return await asyncio.wait_for(call(), timeout_s)
    except StopAsyncIteration:  # a stream ended normally
        raise
    except TimeoutError as err:
        raise DependencyUnavailableError(f"{name} did not answer within {timeout_s:g} s") from err
    except Exception as err:
        # Ray re-raises a replica's error as a RayTaskError whose `cause` is the original;
        # ours go on as they are (status and message intact), anything else is an outage.
        cause = getattr(err, "cause", err)
        if isinstance(cause, ServiceError):
            raise cause from None
        raise DependencyUnavailableError(f"{name} failed: {type(err).__name__}: {err}") from err


@contextmanager
def _stage(metrics: Metrics, stage: str, span_name: str, **attributes: Any) -> Iterator[Span]:
    """A pipeline stage: a span (current, so deployment calls nest under it) and its latency."""
    with tracer().start_as_current_span(span_name, attributes=attributes) as span:
        started = time.monotonic()
        yield span
        metrics.observe("cs_stage_seconds", time.monotonic() - started, {"stage": stage})


class RetrieverClient:
    """:class:`KnowledgeSearch` and knowledge ingest over the Retriever deployment."""

    def __init__(
        self, handle: DeploymentHandle, timeout_s: float, ingest_timeout_s: float, metrics: Metrics | None = None
    ) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        self._ingest_timeout_s = ingest_timeout_s
        self._metrics = metrics or Metrics()

    async def ingest(
        self, tenant: str, source: str, batch: SourceBatch, chunking: ChunkingConfig | None
    ) -> dict[str, Any]:
        """Sync one source's batch in the Retriever deployment (atomic; see the knowledge store)."""
        return await call_dependency(
            "knowledge retriever",
            lambda: self._handle.ingest.remote(tenant, source, batch, chunking),
            self._ingest_timeout_s,
        )

    async def generation(self, tenant: str) -> int:
        """The tenant's committed knowledge generation (the answer cache's knowledge version)."""
        return int((await self.state(tenant))["generation"])

    async def state(self, tenant: str) -> dict[str, Any]:
        """The tenant's committed knowledge generation and source cursors."""
        return await call_dependency(
            "knowledge retriever", lambda: self._handle.knowledge_state.remote(tenant), self._timeout_s
        )

    async def search(
        self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None
    ) -> list[RetrievedChunk]:
        """Search through the Retriever deployment."""
        with _stage(self._metrics, "retrieve", "cs.retrieve", tenant=tenant, top_k=top_k):
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
    ) -> AsyncIterator[GenerationChunk]:
        """Stream from the LLM deployment; each chunk must arrive within the timeout."""
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
        try:
            with trace.use_span(span, end_on_exit=False):
                chunks = cast(DeploymentResponseGenerator, handle.generate.remote(request))
            iterator = chunks.__aiter__()
            first = True
            while True:
                try:
                    chunk = await call_dependency("LLM", iterator.__anext__, self._timeout_s)
                except StopAsyncIteration:
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
            span.end()


AdapterResolver = Callable[[str, str], str | None]
"""(tenant, session id) -> the adapter id the session uses now, or None."""


class QueryEmbedder(Protocol):
    """Embeds queries (the Embedder deployment)."""

    async def embed(self, texts: list[str]) -> list[Embedding]:
        """Query embeddings (normalized dense, plus sparse for BGE-M3)."""
        ...


class EmbedderClient:
    """:class:`QueryEmbedder` over the Embedder deployment."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, metrics: Metrics | None = None) -> None:
        self._handle = handle
        self._timeout_s = timeout_s
        self._metrics = metrics or Metrics()

    async def embed(self, texts: list[str]) -> list[Embedding]:
        """Embed queries through the Embedder deployment."""
        with _stage(self._metrics, "embed", "cs.embed", texts=len(texts)):
            return await call_dependency("embedder", lambda: self._handle.embed.remote(texts, "query"), self._timeout_s)


TOOL_CONFIDENCE = 0.9
"""Confidence of an answer backed by a successful tool call (live data from a system of record)."""


def _forced_call(text: str) -> list[ToolCall]:
    """The call in a structured-output generation (``{"name": ..., "arguments": {...}}``)."""
    try:
        # strict=False: a small model may put control characters inside strings.
        data = json.loads(text, strict=False)
        return [ToolCall(name=data["name"], arguments=data.get("arguments") or {})]
    except (ValueError, KeyError, TypeError) as err:
        # Structured output guarantees the schema unless the token budget cut the JSON short.
        raise GenerationError(f"the model's forced tool call is not complete JSON: {text[:200]!r}") from err


TOOL_CALL_TAG = "<tool_call>"


async def _opening(stream: AsyncIterator[GenerationChunk]) -> tuple[list[GenerationChunk], str]:
    """Read chunks until the text shows whether it opens a tool call (or the stream ends)."""
    head: list[GenerationChunk] = []
    text = ""
    async for chunk in stream:
        head.append(chunk)
        text += chunk.text
        stripped = text.lstrip()
        if (
            chunk.finish_reason is not None
            or len(stripped) >= len(TOOL_CALL_TAG)
            or (stripped and not TOOL_CALL_TAG.startswith(stripped))
        ):
            break
    return head, text


async def _chain(head: list[GenerationChunk], rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _replay(text: str) -> AsyncIterator[GenerationChunk]:
    """An answer already generated in full (during tool rounds), as a stream."""
    yield GenerationChunk(text=text, finish_reason="stop")


@dataclass(frozen=True)
class Analysis:
    """What is known about a message before any retrieval."""

    embedding: Embedding
    about_assistant: float  # similarity to an assistant-question example if above threshold, else 0
    intent: Classification | None


class AssistantQuestions:
    """Embeds each message once and recognizes questions about the assistant and the message's intent.

    Questions about the assistant itself ("who are you?") have no answer in a policy
    knowledge base; the persona and the tenant's adapter, trained on the brand's identity,
    answer them. Intents and frustration come from :class:`~services.chat.intents.IntentClassifier`.
    """

    def __init__(
        self,
        examples: list[str],
        threshold: float,
        embedder: QueryEmbedder,
        intents: IntentClassifier | None = None,
    ) -> None:
        self._examples = examples
        self._threshold = threshold
        self._embedder = embedder
        self._intents = intents
        self._vectors: list[list[float]] | None = None

    async def classify(self, message: str, history: list[Turn] | None = None) -> Analysis:
        """Embed the message once (the retriever reuses it) and classify it."""
        [query] = await self._embedder.embed([message])
        intent_examples = [text for _, text in self._intents.examples] if self._intents else []
        if self._vectors is None and (self._examples or intent_examples):
            # Embedded on first use: the Embedder may still be starting at init.
            self._vectors = [e.dense for e in await self._embedder.embed(self._examples + intent_examples)]
        vectors = self._vectors or []
        about = 0.0
        if self._examples:
            best = max(sum(a * b for a, b in zip(query.dense, v, strict=True)) for v in vectors[: len(self._examples)])
            about = round(min(best, 1.0), 4) if best >= self._threshold else 0.0
        intent = None
        if self._intents is not None:
            intent = self._intents.classify(message, query.dense, vectors[len(self._examples) :], history or [])
        return Analysis(query, about, intent)


@dataclass
class PreparedAnswer:
    """What is known before the first token: grounding, adapter, and the opened generation if any.

    ``chunks`` is None when the reply is the fallback sentence.
    """

    tenant: TenantConfig
    session_id: str
    question: str
    grounding: Grounding
    confidence: float = 0.0
    adapter: str | None = None
    chunks: AsyncIterator[GenerationChunk] | None = None
    first_chunk: GenerationChunk | None = None
    remember: bool = True  # False when the caller keeps the conversation (OpenAI-style requests)
    standard_reply: str | None = None  # a reply given without the model (handover, guardrails)
    actions: list[dict[str, Any]] = field(default_factory=list)
    intent: str | None = None
    cached_reply: ChatReply | None = None  # a cache hit: nothing else runs
    cache_slot: str | None = None  # where to cache this answer once complete
    decoder: ReplyStreamDecoder | None = None  # structured replies: pulls the response out of the JSON
    usage: Usage | None = None
    finish_reason: str = "stop"
    started: float = 0.0  # monotonic time the request reached the pipeline
    span: Span | None = None  # the request's cs.chat span, ended when the reply is complete
    done: bool = False  # the request's metrics are recorded


class ChatPipeline:
    """The dialogue pipeline of one orchestrator replica."""

    def __init__(
        self,
        config: OrchestratorConfig,
        retriever: KnowledgeSearch,
        generator: AnswerGenerator,
        adapter_resolver: AdapterResolver | None = None,
        assistant_questions: AssistantQuestions | None = None,
        sessions: SessionMemory | None = None,
        cache: AnswerCache | None = None,
        knowledge_version: Callable[[str], Awaitable[int]] | None = None,
        metrics: Metrics | None = None,
        tools: ToolRunner | None = None,
    ) -> None:
        self._config = config
        self._retriever = retriever
        self._generator = generator
        self._resolve_adapter = adapter_resolver
        self._assistant_questions = assistant_questions
        self._sessions = sessions or InProcessSessionMemory(config.session)
        self._cache = cache
        self._knowledge_version = knowledge_version
        self._metrics = metrics or Metrics()
        self._tools = tools

    async def prepare(
        self, tenant: TenantConfig, request: ChatRequest, history: list[Turn] | None = None
    ) -> PreparedAnswer:
        """Retrieve, ground and start generating; every failure here is still a clean HTTP error.

        The first generated chunk is awaited here so that an engine error, an unknown
        adapter or an over-long prompt is reported as a status code, not mid-stream.
        The request's span and clock start here and stop when :meth:`stream` has given the
        reply (or failed).

        Args:
            tenant: The caller's tenant.
            request: The message.
            history: Earlier turns sent by the caller (OpenAI-style); then session memory is
                neither read nor written.

        """
        started = time.monotonic()
        span = tracer().start_span("cs.chat", attributes={"tenant": tenant.tenant})
        try:
            with trace.use_span(span, end_on_exit=False):
                prepared = await self._prepare(tenant, request, history)
        except BaseException as err:
            self._request_done(tenant.tenant, "error" if isinstance(err, Exception) else "cancelled", started, span)
            raise
        prepared.started, prepared.span = started, span
        return prepared

    async def _prepare(self, tenant: TenantConfig, request: ChatRequest, history: list[Turn] | None) -> PreparedAnswer:
        if len(request.message) > self._config.max_message_chars:
            raise InvalidRequestError(
                f"message has {len(request.message)} characters; the limit is {self._config.max_message_chars}"
            )
        session_id = request.session_id or uuid.uuid4().hex
        # Shoppers' words and ids only at DEBUG: INFO logs carry no personal data.
        logger.debug("message from user %r in session %r: %r", request.user_id, session_id, request.message)
        remember = history is None
        if history is None:
            history = await self._sessions.history(tenant.tenant, session_id)
        else:
            history = within_budget(history[-self._config.session.max_turns :], self._config.session.max_history_tokens)
        # Resolved once per request: a swap while this answer streams does not touch it.
        registered = self._resolve_adapter(tenant.tenant, session_id) if self._resolve_adapter else None
        adapter = registered or tenant.adapter
        analysis = (
            await self._assistant_questions.classify(request.message, history) if self._assistant_questions else None
        )
        embedding = analysis.embedding if analysis else None
        about_assistant = analysis.about_assistant if analysis else 0.0
        if analysis is not None and analysis.intent is not None:
            standard = self._standard_reply(tenant, analysis.intent, len(history))
            if standard is not None:
                standard.session_id, standard.question, standard.remember = session_id, request.message, remember
                return standard
            if analysis.intent.intent == CHIT_CHAT and not about_assistant:
                about_assistant = analysis.intent.score  # greetings and thanks: the persona answers
        cache_slot = None
        if self._cache is not None and self._knowledge_version is not None and not history:
            generation = await self._knowledge_version(tenant.tenant)
            cache_slot = cache_key(tenant.tenant, generation, adapter, request.message)
            cached = await self._cache.get(cache_slot)
            lookup = {"tenant": tenant.tenant, "result": "miss" if cached is None else "hit"}
            self._metrics.inc("cs_answer_cache_lookups", lookup)
            if cached is not None:
                reply = cached.model_copy(update={"session_id": session_id, "cached": True})
                return PreparedAnswer(
                    tenant, session_id, request.message, Grounding([], cached.confidence), cached.confidence,
                    adapter=cached.adapter, remember=remember, cached_reply=reply,
                )  # fmt: skip

        if about_assistant:
            grounding = Grounding(chunks=[], confidence=0.0)
            prepared = PreparedAnswer(tenant, session_id, request.message, grounding, confidence=about_assistant)
        else:
            hits = await self._retriever.search(
                tenant.tenant, request.message, self._config.retrieval_candidates, embedding
            )
            grounding = ground(hits, self._config.relevance_threshold, self._config.retrieval_top_k)
            prepared = PreparedAnswer(tenant, session_id, request.message, grounding, confidence=grounding.confidence)
        prepared.remember = remember
        prepared.intent = analysis.intent.intent if analysis and analysis.intent else None
        offered = self._tools.offered(prepared.intent, request.message) if self._tools else []
        if grounding.is_empty and not about_assistant and not offered:
            return prepared
        prepared.adapter = adapter
        messages = build_messages(tenant.persona, grounding, history, request.message)
        if offered:
            answered = await self._tool_rounds(prepared, messages, offered, request.user_id)
            if answered is not None:
                return answered
        else:
            prepared.cache_slot = cache_slot  # answers that called tools depend on live data: never cached
        schema = None
        if self._config.structured_replies:
            messages[0] = ChatMessage(role="system", content=f"{messages[0].content}\n\n{REPLY_INSTRUCTION}")
            schema = reply_schema(self._config.sampling.max_tokens * CHARS_PER_TOKEN)
            prepared.decoder = ReplyStreamDecoder()
        prepared.chunks = aiter(
            self._generator.stream(
                messages, self._config.sampling, prepared.adapter, json_schema=schema, tenant=tenant.tenant
            )
        )
        try:
            prepared.first_chunk = await anext(prepared.chunks)
        except StopAsyncIteration as err:
            raise GenerationError("the LLM returned no output") from err
        return prepared

    async def _tool_rounds(
        self, prepared: PreparedAnswer, messages: list[ChatMessage], offered: list[ToolConfig], user_id: str
    ) -> PreparedAnswer | None:
        """Let the model call tools for up to ``max_rounds`` rounds, appending calls and results to ``messages``.

        Returns:
            A prepared reply when the rounds end the answer (the model answered in text, a
            tool failed, or the conversation was handed over); None when the caller should
            now generate the answer from the extended messages.

        """
        assert self._tools is not None
        specs = [function_spec(t) for t in offered]
        required = self._tools.required(prepared.intent)
        replies = prepared.tenant.standard_replies or self._config.standard_replies
        for round_no in range(self._config.tools.max_rounds):
            forced = required if round_no == 0 else None
            if forced is not None:
                text, _ = await self._collect(
                    messages, prepared.adapter, None, forced_call_schema(forced), prepared.tenant.tenant
                )
                calls = _forced_call(text)
                text = f"<tool_call>\n{text}\n</tool_call>"
            else:
                stream = aiter(
                    self._generator.stream(
                        messages, self._call_sampling(), prepared.adapter, tools=specs, tenant=prepared.tenant.tenant
                    )
                )
                head, opening = await _opening(stream)
                if not opening.lstrip().startswith(TOOL_CALL_TAG):
                    # A text answer: stream it as it comes, no tool round needed.
                    prepared.chunks = _chain(head, stream)
                    prepared.first_chunk = await anext(prepared.chunks)
                    return prepared
                calls = []
                for chunk in head:
                    calls = chunk.tool_calls or calls
                parts = [c.text for c in head]
                async for chunk in stream:
                    parts.append(chunk.text)
                    calls = chunk.tool_calls or calls
                text = "".join(parts)
            if not calls:
                prepared.chunks = _replay(text)
                prepared.first_chunk = await anext(prepared.chunks)
                return prepared
            messages.append(ChatMessage(role="assistant", content=text))
            for call in calls:
                result = await self._tools.run(call, user_id)
                prepared.actions.append(result.action)
                messages.append(ChatMessage(role="tool", content=result.content))
                if not result.ok:
                    prepared.standard_reply = replies.tool_failure
                    return prepared
                if result.action["type"] == "handoff":
                    prepared.standard_reply = replies.handoff
                    return prepared
            # A system of record answered: as sure as the knowledge base, or more.
            prepared.confidence = max(prepared.confidence, TOOL_CONFIDENCE)
            if forced is not None:
                # A model that must be told which tool to call tends to answer the next round
                # with another call in plain JSON (seen with the 0.5B model): answer without tools.
                return None
        return None

    async def _collect(
        self,
        messages: list[ChatMessage],
        adapter: str | None,
        tools: list[dict[str, Any]] | None,
        json_schema: dict[str, Any] | None,
        tenant: str,
    ) -> tuple[str, list[ToolCall]]:
        """One whole generation: its text and the tool calls the LLM deployment parsed from it."""
        parts: list[str] = []
        calls: list[ToolCall] = []
        sampling = self._call_sampling()
        async for chunk in self._generator.stream(
            messages, sampling, adapter, tools=tools, json_schema=json_schema, tenant=tenant
        ):
            parts.append(chunk.text)
            calls = chunk.tool_calls or calls
        return "".join(parts), calls

    def _call_sampling(self) -> SamplingConfig:
        """The answer's sampling with room for a tool call (JSON) in the budget."""
        budget = max(self._config.sampling.max_tokens, self._config.tools.max_call_tokens)
        return self._config.sampling.model_copy(update={"max_tokens": budget})

    async def stream(self, prepared: PreparedAnswer) -> AsyncIterator[str | ChatReply]:
        """Yield text pieces, then the final :class:`ChatReply`; the turn is saved at the end.

        The request is counted (``cs_requests``, ``cs_request_seconds``) and its span ended
        just before the reply is yielded, or when the stream fails or is abandoned.
        """
        try:
            async for item in self._stream(prepared):
                if isinstance(item, ChatReply):
                    self._request_done(
                        prepared.tenant.tenant, _outcome(prepared), prepared.started, prepared.span, prepared, item
                    )
                    prepared.done = True
                yield item
        except BaseException as err:
            if not prepared.done:
                prepared.done = True
                outcome = "error" if isinstance(err, Exception) else "cancelled"  # GeneratorExit: the client left
                self._request_done(prepared.tenant.tenant, outcome, prepared.started, prepared.span, prepared)
            raise

    def _request_done(
        self,
        tenant: str,
        outcome: str,
        started: float,
        span: Span | None,
        prepared: PreparedAnswer | None = None,
        reply: ChatReply | None = None,
    ) -> None:
        """Count the request, end its span and log it (no message text: see ``logs``)."""
        seconds = time.monotonic() - started
        tags = {"tenant": tenant, "outcome": outcome}
        self._metrics.inc("cs_requests", tags)
        self._metrics.observe("cs_request_seconds", seconds, tags)
        details: dict[str, Any] = {"tenant": tenant, "outcome": outcome, "duration_ms": round(seconds * 1000, 1)}
        if prepared is not None:
            details |= {"intent": prepared.intent, "adapter": prepared.adapter, "cached": bool(prepared.cached_reply)}
            details["sources"] = len(prepared.grounding.chunks)
            if prepared.usage is not None:
                details |= {"prompt_tokens": prepared.usage.prompt_tokens}
                details |= {"completion_tokens": prepared.usage.completion_tokens}
        if reply is not None:
            details |= {"reply_id": reply.reply_id, "confidence": reply.confidence}
        if span is not None:
            span.set_attributes({k: v for k, v in details.items() if v is not None and k != "duration_ms"})
            span.end()
        logger.info("chat request %s", outcome, extra=details)

    async def _stream(self, prepared: PreparedAnswer) -> AsyncIterator[str | ChatReply]:
        if prepared.cached_reply is not None:
            reply = prepared.cached_reply.model_copy(update={"reply_id": uuid.uuid4().hex})
            yield reply.response
            await self._remember(prepared, reply.response, reply.reply_id)
            yield reply
            return
        if prepared.chunks is None or prepared.first_chunk is None:
            if prepared.standard_reply is not None:
                text, confidence = prepared.standard_reply, prepared.confidence
            else:
                text, confidence = prepared.tenant.fallback_message or self._config.fallback_message, 0.0
            yield text
            yield await self._finish(prepared, text, confidence=confidence)
            return
        parts: list[str] = []
        chunk: GenerationChunk | None = prepared.first_chunk
        decoder = prepared.decoder
        while chunk is not None:
            text = decoder.feed(chunk.text) if decoder else chunk.text
            if text:
                parts.append(text)
                yield text
            if chunk.finish_reason is not None:
                prepared.finish_reason = chunk.finish_reason
                if chunk.prompt_tokens is not None and chunk.completion_tokens is not None:
                    prepared.usage = Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)
            chunk = await anext(prepared.chunks, None)
        confidence = prepared.confidence
        if decoder is not None:
            confidence = combined_confidence(confidence, decoder.model_confidence())
        reply = await self._finish(prepared, "".join(parts).strip(), confidence=confidence)
        if prepared.cache_slot and self._cache is not None:
            await self._cache.put(prepared.cache_slot, reply)
        yield reply

    async def answer(self, tenant: TenantConfig, request: ChatRequest) -> ChatReply:
        """The whole reply at once."""
        prepared = await self.prepare(tenant, request)
        async for item in self.stream(prepared):
            if isinstance(item, ChatReply):
                return item
        raise GenerationError("the answer stream ended without a reply")

    async def _remember(self, prepared: PreparedAnswer, text: str, reply_id: str) -> None:
        if prepared.remember:
            turn = Turn(user=prepared.question, assistant=text, reply_id=reply_id)
            await self._sessions.append(prepared.tenant.tenant, prepared.session_id, turn)

    async def feedback(self, tenant: TenantConfig, request: FeedbackRequest) -> None:
        """Record the shopper's verdict on one of the session's recent replies.

        Raises:
            NotFoundError: no such reply in this tenant's session (another tenant's is invisible).

        """
        turns = await self._sessions.history(tenant.tenant, request.session_id)
        if not any(t.reply_id == request.reply_id for t in turns):
            raise NotFoundError(
                f"reply {request.reply_id!r} is not among the recent replies of session {request.session_id!r}"
            )
        if request.helpful is not None:
            verdict = "helpful" if request.helpful else "not_helpful"
            self._metrics.inc("cs_feedback", {"tenant": tenant.tenant, "verdict": verdict})
        if request.resolved is not None:
            verdict = "resolved" if request.resolved else "unresolved"
            self._metrics.inc("cs_feedback", {"tenant": tenant.tenant, "verdict": verdict})

    async def _finish(self, prepared: PreparedAnswer, text: str, confidence: float) -> ChatReply:
        reply_id = uuid.uuid4().hex
        await self._remember(prepared, text, reply_id)
        return ChatReply(
            reply_id=reply_id,
            response=text,
            confidence=confidence,
            sources=[Source.model_validate(s) for s in sources_of(prepared.grounding)],
            session_id=prepared.session_id,
            adapter=prepared.adapter,
            usage=prepared.usage,
            actions=prepared.actions,
            intent=prepared.intent,
        )

    def _standard_reply(self, tenant: TenantConfig, intent: Classification, turns: int) -> PreparedAnswer | None:
        """A reply the model must not give: handover, sensitive topics, out-of-scope requests."""
        replies = tenant.standard_replies or self._config.standard_replies
        config = self._config.intents
        signals = intent.frustration
        reason = None
        if intent.intent == HUMAN_AGENT:
            reason = "the shopper asked for a human agent"
        elif len(signals) >= config.frustration_handoff or (intent.intent == COMPLAINT and signals):
            reason = "frustration: " + "; ".join(signals)
        if reason is not None:
            text, action = replies.handoff, {"type": "handoff", "reason": reason}
        elif intent.intent == SENSITIVE:
            text, action = replies.sensitive, {"type": "guardrail", "reason": "sensitive topic"}
        elif intent.intent == OUT_OF_SCOPE:
            text, action = replies.out_of_scope, {"type": "guardrail", "reason": "out of scope"}
        else:
            return None
        return PreparedAnswer(
            tenant, "", "", Grounding([], 0.0), confidence=intent.score,
            standard_reply=text, actions=[action], intent=intent.intent,
        )  # fmt: skip


def _outcome(prepared: PreparedAnswer) -> str:
    """The ``outcome`` label of a completed request (see ``REQUEST_OUTCOMES``)."""
    kinds = {str(a.get("type")) for a in prepared.actions}
    if "handoff" in kinds:
        return "handover"
    if "guardrail" in kinds:
        return "guardrail"
    if "tool_failed" in kinds:
        return "tool_failed"
    if prepared.cached_reply is None and prepared.chunks is None and prepared.standard_reply is None:
        return "fallback"
    return "answered"


@serve.ingress()
class Orchestrator:
    """Ray Serve ingress deployment: REST API over the dialogue pipeline."""

    def __init__(
        self,
        config: OrchestratorConfig,
        embedder: DeploymentHandle,
        retriever: DeploymentHandle,
        llm: DeploymentHandle,
        llm_config: LLMConfig,
        observability: ObservabilityConfig | None = None,
    ) -> None:
        observability = observability or ObservabilityConfig()
        configure_replica_logging(observability.log_level, observability.log_format)
        metrics = RayMetrics(names_for("Orchestrator"))
        self._config = config
        settings = ServiceSettings()
        self._auth = ApiKeyAuth.from_config(config.tenants, settings.api_keys)
        self._admin_keys = admin_digests([k.get_secret_value() for k in config.admin_api_keys] + settings.admin_keys)
        self._adapter_admin: AdapterAdmin | None = None
        resolver: AdapterResolver | None = None
        if llm_config.adapters_dir:
            registry = AdapterRegistry(Path(llm_config.adapters_dir))
            resolver = registry.resolve

            async def load_check(adapter: str) -> None:
                await call_dependency("LLM", lambda: llm.check_adapter.remote(adapter), config.dependency_timeout_s)

            self._adapter_admin = AdapterAdmin(registry, llm_config.model, llm_config.max_lora_rank, load_check)
        self._knowledge = RetrieverClient(retriever, config.dependency_timeout_s, config.ingest_timeout_s, metrics)
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self._sessions = open_session_memory(config.session, redis_url)
        self._pipeline = ChatPipeline(
            config,
            self._knowledge,
            LLMClient(llm, config.dependency_timeout_s, metrics),
            resolver,
            AssistantQuestions(
                config.assistant_questions,
                config.assistant_question_threshold,
                EmbedderClient(embedder, config.dependency_timeout_s, metrics),
                IntentClassifier(config.intents),
            ),
            self._sessions,
            open_answer_cache(config.answer_cache, redis_url),
            self._knowledge.generation,
            metrics,
            ToolRunner(config.tools, metrics=metrics) if config.tools.enabled else None,
        )
        self._dependencies: dict[str, DeploymentHandle] = {"embedder": embedder, "retriever": retriever, "llm": llm}

    def __serve_build_asgi_app__(self) -> Any:
        # Serve calls this after __init__: the app is built from this replica's state.
        return create_api(
            self._config,
            self._pipeline,
            self._auth,
            self._check_dependencies,
            adapter_admin=self._adapter_admin,
            admin_keys=self._admin_keys,
            knowledge=self._knowledge,
            served_by=serve.get_replica_context().replica_id.unique_id,
        )

    async def _check_dependencies(self) -> dict[str, str]:
        async def one(handle: DeploymentHandle) -> str:
            try:
                await call_dependency("health", lambda: handle.check_health.remote(), 10)
                return "ok"
            except ServiceError as err:
                return f"error: {err.message}"

        names = list(self._dependencies)
        results = dict(zip(names, await asyncio.gather(*(one(self._dependencies[n]) for n in names)), strict=True))
        if isinstance(self._sessions, RedisSessionMemory):
            try:
                await self._sessions.ping()
                results["session_memory"] = "ok"
            except ServiceError as err:
                results["session_memory"] = f"error: {err.message}"
        return results


def build_orchestrator(
    config: OrchestratorConfig,
    *,
    embedder: Application,
    retriever: Application,
    llm: Application,
    llm_config: LLMConfig,
    observability: ObservabilityConfig | None = None,
) -> Application:
    """Bind the ingress to the three deployments it calls (``llm_config`` locates the adapter store)."""
    deployment = serve.deployment(name="Orchestrator", **config.deployment.to_serve_options())(Orchestrator)
    return deployment.bind(config, embedder, retriever, llm, llm_config, observability or ObservabilityConfig())
