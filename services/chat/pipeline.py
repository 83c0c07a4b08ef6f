"""The dialogue pipeline of one orchestrator replica: a message in, an answer's stream out.

``prepare`` runs the steps that decide the answer, in order, each a small method:
check the message and load the conversation; analyze it (intent, "about the assistant");
give a standard reply when the model must not answer; serve the cache; retrieve and
ground; give the fallback when nothing is relevant; let tools act; start the generation.
Every step before the first token still fails as a clean HTTP error. The returned
:class:`ReplyStream` then delivers the text and the final reply, and saves the turn.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from opentelemetry import trace

from services.chat.accounting import RequestRecord
from services.chat.analysis import Analysis, MessageAnalyzer
from services.chat.answer_cache import AnswerCache, cache_key
from services.chat.answers import (
    NO_GROUNDING,
    Answer,
    CachedAnswer,
    Conversation,
    FixedAnswer,
    GeneratedAnswer,
    Outcome,
    fallback,
)
from services.chat.clients import AdapterResolver, AnswerGenerator, KnowledgeSearch, PassageReranker
from services.chat.contracts import ChatReply, ChatRequest, FeedbackRequest
from services.chat.delivery import ReplyDelivery, ReplyStream
from services.chat.grounding import Grounding, build_messages, ground, passage_of
from services.chat.intents import CHIT_CHAT, COMPLAINT, HUMAN_AGENT, OUT_OF_SCOPE, SENSITIVE, Classification
from services.chat.reply_form import Misfit, retry_messages
from services.chat.structured_reply import (
    CHARS_PER_TOKEN,
    ReplyStreamDecoder,
    reply_schema,
    with_reply_instruction,
)
from services.chat.tool_rounds import TOOL_CONFIDENCE, RoundsResult, ToolRounds
from services.config import OrchestratorConfig, StandardReplies, TenantConfig, ToolConfig
from services.control_plane.recorder import ConversationRecorder
from services.errors import DependencyUnavailableError, GenerationError, InvalidRequestError, NotFoundError
from services.observability.metrics import Metrics
from services.observability.tracing import tracer
from services.schemas import ChatMessage, Embedding, GenerationChunk, RetrievedChunk
from services.sessions import InProcessSessionMemory, SessionIds, SessionMemory, Turn, within_budget
from services.tools import ToolRunner

logger = logging.getLogger(__name__)


class ChatPipeline:
    """The dialogue pipeline of one orchestrator replica."""

    def __init__(
        self,
        config: OrchestratorConfig,
        retriever: KnowledgeSearch,
        generator: AnswerGenerator,
        adapter_resolver: AdapterResolver | None = None,
        analyzer: MessageAnalyzer | None = None,
        sessions: SessionMemory | None = None,
        cache: AnswerCache | None = None,
        knowledge_version: Callable[[str], Awaitable[int]] | None = None,
        metrics: Metrics | None = None,
        tools: ToolRunner | None = None,
        reranker: PassageReranker | None = None,
        session_ids: SessionIds | None = None,
        recorder: ConversationRecorder | None = None,
    ) -> None:
        self._config = config
        self._retriever = retriever
        self._reranker = reranker if config.reranking is not None else None
        self._generator = generator
        self._resolve_adapter = adapter_resolver
        self._analyzer = analyzer
        self._sessions = sessions or InProcessSessionMemory(config.session)
        self._session_ids = session_ids or SessionIds()
        self._cache = cache
        self._knowledge_version = knowledge_version
        self._metrics = metrics or Metrics()
        self._tool_rounds = ToolRounds(config.tools, config.sampling, generator, tools) if tools else None
        self._delivery = ReplyDelivery(self._sessions, cache)
        self._recorder = recorder

    async def prepare(
        self, tenant: TenantConfig, request: ChatRequest, history: list[Turn] | None = None, *, tools: bool = True
    ) -> ReplyStream:
        """Decide the answer and start generating it; every failure here is still a clean HTTP error.

        The first generated chunk is awaited here so that an engine error, an unknown
        adapter or an over-long prompt is reported as a status code, not mid-stream.
        The request's span and clock start here and stop when the stream has given the
        reply (or failed).

        Args:
            tenant: The caller's tenant.
            request: The message.
            history: Earlier turns sent by the caller (OpenAI-style); then session memory is
                neither read nor written.
            tools: Whether tools may act for this caller; False when the request names no
                shopper (an OpenAI-style call without ``user``), so no shared identity acts.

        """
        span = tracer().start_span("cs.chat", attributes={"tenant": tenant.tenant})
        record = RequestRecord(
            tenant.tenant, self._metrics, span, recorder=self._recorder, profile=tenant, user_id=request.user_id,
            question=request.message,
        )  # fmt: skip
        try:
            with trace.use_span(span, end_on_exit=False):
                answer = await self._decide(tenant, request, history, tools, record)
        except BaseException as err:
            record.close("error" if isinstance(err, Exception) else "cancelled", status=_status_of(err))
            raise
        return ReplyStream(self._delivery, answer, record)

    async def answer(
        self, tenant: TenantConfig, request: ChatRequest, history: list[Turn] | None = None, *, tools: bool = True
    ) -> ChatReply:
        """The whole reply at once."""
        return await (await self.prepare(tenant, request, history, tools=tools)).reply()

    # --- the steps that decide the answer -----------------------------------------------------

    async def _decide(
        self, tenant: TenantConfig, request: ChatRequest, history: list[Turn] | None, tools: bool,
        record: RequestRecord,
    ) -> Answer:  # fmt: skip
        conversation = await self._conversation(tenant, request, history)
        # Resolved once per request: a swap while this answer streams does not touch it.
        adapter = self._adapter_of(conversation)
        analysis = await self._analyzer.analyze(request.message, conversation.history) if self._analyzer else None
        record.vector = analysis.embedding.dense if analysis else None
        intent = analysis.intent if analysis else None
        if intent is not None and (standard := self._standard_reply(conversation, intent)) is not None:
            return standard
        about_assistant = self._about_assistant(analysis)
        intent_name = intent.intent if intent else None
        offered = self._offered(conversation, intent_name, tools)
        # A message that may need a tool depends on live data: never answered from the cache.
        cache_slot = None if offered else await self._cache_slot(conversation, adapter)
        if cache_slot and (cached := await self._cached(conversation, cache_slot)) is not None:
            return cached
        grounding = NO_GROUNDING if about_assistant else await self._ground(conversation, analysis)
        confidence = about_assistant or grounding.confidence
        if grounding.is_empty and not about_assistant and not offered:
            return fallback(conversation, self._fallback_text(tenant), intent_name)
        messages = build_messages(tenant.persona, grounding, conversation.history, request.message)
        # What every answer from here on rests on.
        basis: dict[str, Any] = {"conversation": conversation, "grounding": grounding, "adapter": adapter}
        basis["intent"] = intent_name
        if not offered:
            return await self._generate(messages, basis, confidence, cache_slot=cache_slot)
        # Answers that called tools depend on live data: never cached.
        rounds = await self._run_tools(messages, offered, conversation, adapter, intent_name)
        if rounds.tool_answered:
            confidence = max(confidence, TOOL_CONFIDENCE)
        if rounds.stopped_by is not None:
            return self._tools_stopped(rounds, basis, confidence)
        if rounds.text is not None:
            first = await _first_chunk(rounds.text)
            return GeneratedAnswer(
                first_chunk=first, rest=rounds.text, confidence=confidence, actions=rounds.actions,
                fallback_text=self._fallback_text(tenant), **basis,
            )  # fmt: skip
        return await self._generate(messages, basis, confidence, actions=rounds.actions)

    async def _conversation(
        self, tenant: TenantConfig, request: ChatRequest, history: list[Turn] | None
    ) -> Conversation:
        """Check the message and load the turns before it (from session memory, or as the caller sent them)."""
        if len(request.message) > self._config.max_message_chars:
            raise InvalidRequestError(
                f"message has {len(request.message)} characters; the limit is {self._config.max_message_chars}"
            )
        if request.session_id is None:
            session_id = self.open_session(tenant, request.user_id)
        elif history is None:
            session_id = self._owned_session(tenant, request.user_id, request.session_id)
        else:
            session_id = request.session_id  # the caller keeps this conversation: nothing is read or written
        # Shoppers' words and ids only at DEBUG: INFO logs carry no personal data.
        logger.debug("message from user %r in session %r: %r", request.user_id, session_id, request.message)
        remember = history is None
        if history is None:
            history = await self._sessions.history(tenant.tenant, session_id)
        else:
            session = self._config.session
            history = within_budget(history[-session.max_turns :], session.max_history_tokens)
        deadline = time.monotonic() + self._config.request_timeout_s
        return Conversation(tenant, session_id, request.user_id, request.message, history, remember, deadline)

    def open_session(self, tenant: TenantConfig, user_id: str) -> str:
        """A new conversation's id, issued to this user of this tenant (nothing is stored until its first turn)."""
        return self._session_ids.issue(tenant.tenant, user_id)

    def _owned_session(self, tenant: TenantConfig, user_id: str, session_id: str) -> str:
        """``session_id`` when it was issued to this user of this tenant.

        Raises:
            NotFoundError: it was not (another user's, another tenant's, or made up by the
                client): the same answer in every case, so it reveals nothing about the session.

        """
        if not self._session_ids.owns(tenant.tenant, user_id, session_id):
            raise NotFoundError(
                "session_id is not a session of this user; omit it to start a new conversation "
                "(the reply carries the id), or open one with POST /v1/sessions"
            )
        return session_id

    def _offered(self, conversation: Conversation, intent: str | None, tools: bool) -> list[ToolConfig]:
        """The tools the model may call for this message (none when no shopper is named)."""
        if self._tool_rounds is None or not tools:
            return []
        return self._tool_rounds.offered(intent, conversation.question, conversation.tenant)

    def _adapter_of(self, conversation: Conversation) -> str | None:
        """The adapter registered for the tenant now (a canary may pick per session), else the configured one."""
        tenant = conversation.tenant
        registered = self._resolve_adapter(tenant.tenant, conversation.session_id) if self._resolve_adapter else None
        return registered or tenant.adapter

    def _standard_reply(self, conversation: Conversation, intent: Classification) -> FixedAnswer | None:
        """A reply the model must not give: handover, sensitive topics, out-of-scope requests."""
        replies = self._replies(conversation.tenant)
        signals = intent.frustration
        reason = None
        outcome: Outcome
        if intent.intent == HUMAN_AGENT:
            reason = "the shopper asked for a human agent"
        elif len(signals) >= self._config.intents.frustration_handoff or (intent.intent == COMPLAINT and signals):
            reason = "frustration: " + "; ".join(signals)
        if reason is not None:
            text, action, outcome = replies.handoff, {"type": "handoff", "reason": reason}, "handover"
        elif intent.intent == SENSITIVE:
            text, action, outcome = replies.sensitive, {"type": "guardrail", "reason": "sensitive topic"}, "guardrail"
        elif intent.intent == OUT_OF_SCOPE:
            text, action, outcome = replies.out_of_scope, {"type": "guardrail", "reason": "out of scope"}, "guardrail"
        else:
            return None
        return FixedAnswer(
            conversation=conversation, outcome=outcome, confidence=intent.score,
            intent=intent.intent, actions=[action], text=text,
        )  # fmt: skip

    @staticmethod
    def _about_assistant(analysis: Analysis | None) -> float:
        """Similarity to a question about the assistant; greetings and thanks count too (the persona answers)."""
        if analysis is None:
            return 0.0
        if analysis.about_assistant:
            return analysis.about_assistant
        if analysis.intent is not None and analysis.intent.intent == CHIT_CHAT:
            return analysis.intent.score
        return 0.0

    async def _cache_slot(self, conversation: Conversation, adapter: str | None) -> str | None:
        """Where the answer to a conversation's first message is cached, for this knowledge and adapter."""
        if self._cache is None or self._knowledge_version is None or conversation.history:
            return None
        generation = await self._knowledge_version(conversation.tenant.tenant)
        return cache_key(conversation.tenant.tenant, generation, adapter, conversation.question)

    async def _cached(self, conversation: Conversation, slot: str) -> CachedAnswer | None:
        assert self._cache is not None  # a slot exists only with a cache
        cached = await self._cache.get(slot)
        lookup = {"tenant": conversation.tenant.tenant, "result": "miss" if cached is None else "hit"}
        self._metrics.inc("cs_answer_cache_lookups", lookup)
        if cached is None:
            return None
        reply = cached.model_copy(update={"session_id": conversation.session_id, "cached": True})
        return CachedAnswer(
            conversation=conversation,
            confidence=cached.confidence,
            grounding=Grounding([], cached.confidence),
            adapter=cached.adapter,
            reply=reply,
        )

    async def _ground(self, conversation: Conversation, analysis: Analysis | None) -> Grounding:
        """Retrieve candidates (with the message's embedding, when analyzed) and keep the relevant ones."""
        embedding = analysis.embedding if analysis else None
        _, grounding = await self._search_and_gate(conversation.tenant, conversation.question, embedding)
        return grounding

    async def search_test(self, tenant: TenantConfig, question: str) -> tuple[list[RetrievedChunk], Grounding]:
        """What the relevance gate sees for a question and what it decides (the console's search test).

        The same embedding, retrieval, reranking and gate as a chat; no answer is generated
        and nothing is remembered or recorded.
        """
        embedding = (await self._analyzer.analyze(question, [])).embedding if self._analyzer else None
        return await self._search_and_gate(tenant, question, embedding)

    async def _search_and_gate(
        self, profile: TenantConfig, question: str, embedding: Embedding | None
    ) -> tuple[list[RetrievedChunk], Grounding]:
        tenant = profile.tenant
        found = await self._retriever.search(tenant, question, self._config.retrieval_candidates, embedding)
        hits = found.hits
        config = self._config
        rerank_threshold = None
        if self._reranker is not None and config.reranking is not None and hits:
            hits = await self._rerank(question, hits[: config.reranking.candidates])
            rerank_threshold = config.reranking.threshold
        threshold = profile.relevance_threshold
        return hits, ground(
            hits,
            config.relevance_threshold if threshold is None else threshold,
            config.retrieval_top_k,
            config.relevance_margin,
            rerank_threshold,
            found.dense_candidates,
        )

    async def _rerank(self, question: str, hits: list[RetrievedChunk]) -> list[RetrievedChunk]:
        """The hits with their cross-encoder scores, best first."""
        assert self._reranker is not None
        scores = await self._reranker.rerank(question, [passage_of(h) for h in hits])
        if len(scores) != len(hits):
            raise DependencyUnavailableError(f"the reranker scored {len(scores)} of {len(hits)} passages")
        scored = [h.model_copy(update={"rerank_score": round(s, 4)}) for h, s in zip(hits, scores, strict=True)]
        return sorted(scored, key=lambda h: h.rerank_score or 0.0, reverse=True)

    async def _run_tools(
        self,
        messages: list[ChatMessage],
        offered: list[ToolConfig],
        conversation: Conversation,
        adapter: str | None,
        intent: str | None,
    ) -> RoundsResult:
        assert self._tool_rounds is not None  # tools are offered only with a runner
        return await self._tool_rounds.run(
            messages,
            offered,
            adapter=adapter,
            tenant=conversation.tenant.tenant,
            user_id=conversation.user_id,
            intent=intent,
            deadline=conversation.deadline,
            idempotency_key=_idempotency_key(conversation),
        )

    def _tools_stopped(self, rounds: RoundsResult, basis: dict[str, Any], confidence: float) -> FixedAnswer:
        """The standard reply after a tool failed or handed the conversation over."""
        replies = self._replies(basis["conversation"].tenant)
        handoff = rounds.stopped_by == "handoff"
        return FixedAnswer(
            outcome="handover" if handoff else "tool_failed",
            confidence=confidence,
            actions=rounds.actions,
            text=replies.handoff if handoff else replies.tool_failure,
            **basis,
        )

    async def _generate(
        self,
        messages: list[ChatMessage],
        basis: dict[str, Any],
        confidence: float,
        *,
        cache_slot: str | None = None,
        actions: list[dict[str, Any]] | None = None,
    ) -> GeneratedAnswer:
        """Start the answer's generation (structured replies: under the reply schema) and await its first chunk.

        Under structured replies an answer from knowledge entries must cite them; one that
        rests on a tool's data (``actions``) or on no entries (questions about the assistant)
        need not.
        """
        schema, decoder, plain = None, None, messages
        # An answer from entries states only numbers the model was shown; a tool's data is live, not checked.
        from_entries = bool(basis["grounding"].chunks) and not actions
        evidence = [m.content for m in messages] if self._config.check_numbers and from_entries else None
        must_cite = self._config.cite_sources and not actions
        entries = len(basis["grounding"].chunks) if must_cite else 0
        if self._config.structured_replies:
            messages = with_reply_instruction(messages, cite=bool(entries))
            schema = reply_schema(self._config.sampling.max_tokens * CHARS_PER_TOKEN, entries)
            decoder = ReplyStreamDecoder()
        conversation: Conversation = basis["conversation"]
        tenant = conversation.tenant.tenant
        chunks = aiter(
            self._generator.stream(
                messages,
                self._config.sampling,
                basis["adapter"],
                json_schema=schema,
                tenant=tenant,
                deadline=conversation.deadline,
            )
        )
        first = await _first_chunk(chunks)

        def retry(reason: Misfit) -> AsyncIterator[GenerationChunk]:
            again = retry_messages(plain, reason, conversation.question)
            return self._generator.stream(
                again, self._config.sampling, basis["adapter"], tenant=tenant, deadline=conversation.deadline
            )

        return GeneratedAnswer(
            **basis,
            confidence=confidence,
            actions=list(actions or []),
            first_chunk=first,
            rest=chunks,
            decoder=decoder,
            cite=decoder is not None and bool(entries),
            evidence=evidence,
            fallback_text=self._fallback_text(conversation.tenant),
            cache_slot=cache_slot,
            retry=retry if self._config.check_form else None,
        )

    def _replies(self, tenant: TenantConfig) -> StandardReplies:
        return tenant.standard_replies or self._config.standard_replies

    def _fallback_text(self, tenant: TenantConfig) -> str:
        return tenant.fallback_message or self._config.fallback_message

    # --- feedback -------------------------------------------------------------------------------

    async def feedback(self, tenant: TenantConfig, request: FeedbackRequest) -> None:
        """Record the shopper's verdict on one of the session's recent replies.

        Raises:
            NotFoundError: no such reply among the recent ones of this user's session (another
                user's or tenant's session is invisible: the same error).

        """
        turns = []
        if self._session_ids.owns(tenant.tenant, request.user_id, request.session_id):
            turns = await self._sessions.history(tenant.tenant, request.session_id)
        if not any(t.reply_id == request.reply_id for t in turns):
            raise NotFoundError(
                f"reply {request.reply_id!r} is not among the recent replies of session {request.session_id!r}"
            )
        if self._recorder is not None:
            self._recorder.feedback(tenant, request.reply_id, request.user_id, request.helpful, request.resolved)
        if request.helpful is not None:
            verdict = "helpful" if request.helpful else "not_helpful"
            self._metrics.inc("cs_feedback", {"tenant": tenant.tenant, "verdict": verdict})
        if request.resolved is not None:
            verdict = "resolved" if request.resolved else "unresolved"
            self._metrics.inc("cs_feedback", {"tenant": tenant.tenant, "verdict": verdict})


def _status_of(err: BaseException) -> int:
    """The HTTP status an error becomes (500 for anything not a service error)."""
    return int(getattr(err, "status_code", 500))


def _idempotency_key(conversation: Conversation) -> str:
    """The same for the same message of the same shopper in the same conversation (a retried request)."""
    parts = (conversation.tenant.tenant, conversation.user_id, conversation.session_id, conversation.question)
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


async def _first_chunk(chunks: AsyncIterator[GenerationChunk]) -> GenerationChunk:
    try:
        return await anext(chunks)
    except StopAsyncIteration as err:
        raise GenerationError("the LLM returned no output") from err
