"""Delivering a decided answer: text pieces, then the final reply; the turn is saved before the reply.

A generated answer under structured replies names the knowledge entries it rests on
(``cited``, before its response). An answer that had entries to rest on and cites none,
or whose reply object never yields a response, is not given: the shopper gets the
fallback sentence instead, and the request counts as a fallback. Nothing of the refused
text is streamed, because the citations come first. An answer from knowledge entries is
also released sentence by sentence, each once its numbers are found in what the model was
shown (:class:`~services.chat.number_check.NumberGuard`); at the first sentence stating a
number none holds, generation stops and the fallback sentence follows what was shown.
Each withheld answer is counted with its reason (``cs_withheld_replies``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.chat.accounting import RequestRecord
from services.chat.answer_cache import AnswerCache
from services.chat.answers import Answer, CachedAnswer, FixedAnswer, GeneratedAnswer, fallback
from services.chat.contracts import ChatReply, Source, Usage
from services.chat.grounding import Grounding, sources_of
from services.chat.number_check import NumberGuard
from services.chat.reply_form import Misfit, misfit
from services.chat.structured_reply import ReplyStreamDecoder, combined_confidence
from services.errors import GenerationError
from services.schemas import GenerationChunk
from services.sessions import SessionMemory, Turn


class ReplyStream:
    """One request's answer as it is delivered: text pieces, then the final :class:`ChatReply`.

    It owns the request's :class:`RequestRecord` and closes it exactly once: just before the
    reply is yielded (with the reply's outcome), or when the stream fails or is abandoned.
    """

    def __init__(self, delivery: ReplyDelivery, answer: Answer, record: RequestRecord) -> None:
        self._delivery = delivery
        self._answer = answer
        self._record = record

    async def __aiter__(self) -> AsyncIterator[str | ChatReply]:
        """Yield the text pieces, then the reply."""
        try:
            async for item in self._delivery.deliver(self._answer, self._record):
                if isinstance(item, ChatReply):
                    self._record.close(item.outcome, self._answer, item)
                yield item
        except BaseException as err:
            status = int(getattr(err, "status_code", 500))
            self._record.close("error" if isinstance(err, Exception) else "cancelled", self._answer, status=status)
            raise

    async def reply(self) -> ChatReply:
        """The whole reply at once."""
        async for item in self:
            if isinstance(item, ChatReply):
                return item
        raise GenerationError("the answer stream ended without a reply")


class ReplyDelivery:
    """Turns answers into replies, remembers the turns, and caches answers to first questions."""

    def __init__(self, sessions: SessionMemory, cache: AnswerCache | None) -> None:
        self._sessions = sessions
        self._cache = cache

    async def deliver(self, answer: Answer, record: RequestRecord) -> AsyncIterator[str | ChatReply]:
        """Text pieces of the answer, then its reply."""
        if isinstance(answer, CachedAnswer):
            # No engine ran for it: the stored reply's token usage is not this request's.
            reply = answer.reply.model_copy(update={"reply_id": uuid.uuid4().hex, "usage": None})
            yield reply.response
            await self._remember(answer, reply.response, reply.reply_id)
            yield reply
        elif isinstance(answer, FixedAnswer):
            yield answer.text
            yield await self._finish(answer, record, answer.text, answer.confidence)
        elif isinstance(answer, GeneratedAnswer):
            async for item in self._deliver_generated(answer, record):
                yield item
        else:
            raise TypeError(f"unknown answer kind {type(answer).__name__}")

    async def _deliver_generated(
        self, answer: GeneratedAnswer, record: RequestRecord
    ) -> AsyncIterator[str | ChatReply]:
        shown: list[str] = []
        judged = answer.retry is not None
        # Text is held back only for a check: its numbers, or the form of its first sentence.
        guard = NumberGuard(answer.evidence) if answer.evidence is not None or judged else None
        first = _Try(_chunks(answer), answer.rest, answer.decoder, guard, judged=judged)
        async for text in _read(answer, record, first, shown):
            yield text
        attempt = first
        if first.misfit is not None and answer.retry is not None:
            # Asked once more in plain text; what it says is judged the same way, and a second misfit is withheld.
            record.retried = first.misfit
            again = aiter(answer.retry(first.misfit))
            attempt = _Try(again, again, None, NumberGuard(answer.evidence), judged=True)
            async for text in _read(answer, record, attempt, shown):
                yield text
        if record.withheld is None and attempt.misfit is not None:
            record.withheld = attempt.misfit
        response = "".join(shown).strip()
        decoder = first.decoder
        if record.withheld is None and answer.cite and decoder is not None and decoder.cited() is None:
            record.withheld = "no_citation"  # the object never named its entries: nothing shows what it rests on
        if record.withheld is None and not response:
            record.withheld = "undecodable"
        if record.withheld is not None:
            # What was shown already passed every check; the fallback follows it as its own paragraph.
            text = f"\n\n{answer.fallback_text}" if response else answer.fallback_text
            yield text
            said = response + text
            yield await self._finish(fallback(answer.conversation, said, answer.intent), record, said, 0.0)
            return
        cited = decoder.cited() if decoder else None
        confidence = _evidence(answer, cited)
        if decoder is not None:
            confidence = combined_confidence(confidence, decoder.model_confidence())
        reply = await self._finish(answer, record, response, confidence, cited=cited)
        if answer.cache_slot and self._cache is not None:
            await self._cache.put(answer.cache_slot, reply)
        yield reply

    async def _finish(
        self, answer: Answer, record: RequestRecord, text: str, confidence: float, *, cited: list[int] | None = None
    ) -> ChatReply:
        reply_id = uuid.uuid4().hex
        await self._remember(answer, text, reply_id)
        chunks = answer.grounding.chunks
        return ChatReply(
            reply_id=reply_id,
            response=text,
            confidence=confidence,
            sources=[Source.model_validate(s) for s in sources_of(answer.grounding)],
            cited=list(dict.fromkeys(chunks[n - 1].chunk.doc_id for n in cited)) if cited is not None else None,
            session_id=answer.conversation.session_id,
            adapter=answer.adapter,
            usage=record.usage,
            actions=answer.actions,
            intent=answer.intent,
            outcome=answer.outcome,
            finish_reason=record.finish_reason,
        )

    async def _remember(self, answer: Answer, text: str, reply_id: str) -> None:
        conversation = answer.conversation
        if conversation.remember:
            turn = Turn(user=conversation.question, assistant=text, reply_id=reply_id)
            await self._sessions.append(conversation.tenant.tenant, conversation.session_id, turn)


@dataclass
class _Try:
    """One generation of the answer as it is read: its chunks, their decoder and the gate that releases text."""

    chunks: AsyncIterator[GenerationChunk]
    source: AsyncIterator[GenerationChunk]  # what to close to stop the engine generating
    decoder: ReplyStreamDecoder | None
    guard: NumberGuard | None  # None: text passes as it comes
    judged: bool  # its form is judged: a misfit stops it (to retry or withhold) instead of being shown
    misfit: Misfit | None = None


async def _read(answer: GeneratedAnswer, record: RequestRecord, attempt: _Try, shown: list[str]) -> AsyncIterator[str]:
    """The text of one try that passes every check, sentence by sentence; ``shown`` collects it.

    A try stops at the first check that fails: the reply cites no shown entry or states a
    number none holds (``record.withheld``), or, before anything is shown, it is not an
    answer's form (``attempt.misfit``: a fragment or the wrong language), when it may be retried.
    """
    conversation = answer.conversation
    titles = [hit.chunk.title for hit in answer.grounding.chunks]
    from_entries = bool(titles) and not answer.actions

    def misfit_of(text: str, *, complete: bool) -> Misfit | None:
        if shown or not attempt.judged:
            return None  # only the start of a reply is judged: what is shown stays shown
        return misfit(text, conversation.question, titles, from_entries=from_entries, complete=complete)

    decoder = attempt.decoder
    async for chunk in attempt.chunks:
        _account(record, chunk)
        text = decoder.feed(chunk.text) if decoder else chunk.text
        cited = decoder.cited() if answer.cite and decoder is not None else None
        if cited is not None and not _rests_on(cited, answer.grounding):
            record.withheld = "no_citation"
            break  # the rest of a withheld answer is never shown: stop generating it
        text, unsupported = attempt.guard.feed(text) if attempt.guard is not None else (text, [])
        if unsupported:
            record.withheld = "unsupported_number"
            break
        attempt.misfit = misfit_of(text, complete=False) if text else None
        if attempt.misfit is not None:
            break
        if text:
            shown.append(text)
            yield text
    if record.withheld is not None or attempt.misfit is not None:
        if hasattr(attempt.source, "aclose"):
            await attempt.source.aclose()  # cancels the engine's generation
        return
    # An answer cut off by the token budget ends at its last complete sentence, if it has one.
    if attempt.guard is None:
        return
    text, unsupported = attempt.guard.flush(drop_unfinished=record.finish_reason == "length" and bool(shown))
    if unsupported:
        record.withheld = "unsupported_number"
        return
    attempt.misfit = misfit_of(text, complete=True)
    if attempt.misfit is None and text:
        shown.append(text)
        yield text


async def _chunks(answer: GeneratedAnswer) -> AsyncIterator[GenerationChunk]:
    yield answer.first_chunk
    async for chunk in answer.rest:
        yield chunk


def _account(record: RequestRecord, chunk: GenerationChunk) -> None:
    """Note how generation ended and what it cost, from the last chunk."""
    if chunk.finish_reason is None:
        return
    record.finish_reason = chunk.finish_reason
    if chunk.prompt_tokens is not None and chunk.completion_tokens is not None:
        record.usage = Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)


def _rests_on(cited: list[int], grounding: Grounding) -> bool:
    """Whether the citations name at least one entry the model was shown, and only such entries."""
    return bool(cited) and all(1 <= n <= len(grounding.chunks) for n in cited)


def _evidence(answer: GeneratedAnswer, cited: list[int] | None) -> float:
    """The retrieval evidence behind the answer: the best cited entry's similarity when it cites."""
    if not cited or not answer.cite:
        return answer.confidence
    return round(max(answer.grounding.chunks[n - 1].dense_score or 0.0 for n in cited), 4)
