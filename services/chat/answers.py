"""The kinds of answer, each made knowing its outcome; what is known of a request before its first token.

The pipeline decides the kind once, when it makes the answer: a cached reply, a reply
given without the model (handover, guardrail, tool failure, fallback), or a generated
stream. The kind carries the ``outcome`` label of ``cs_requests``; nothing reconstructs it
afterwards. The one change of kind after the first token is the delivery's checks': a
generated answer that rests on no shown entry, or states a number none holds, is delivered
as a fallback answer (:mod:`services.chat.delivery`), which carries its own outcome.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from services.chat.contracts import ChatReply
from services.chat.grounding import Grounding
from services.chat.reply_form import Misfit
from services.chat.structured_reply import ReplyStreamDecoder
from services.config import TenantConfig
from services.schemas import GenerationChunk
from services.sessions import Turn

Outcome = Literal["answered", "fallback", "handover", "guardrail", "tool_failed"]
"""How a completed request ended (``error`` and ``cancelled`` are the record's, for requests that did not)."""

NO_GROUNDING = Grounding(chunks=[], confidence=0.0)


@dataclass(frozen=True)
class Conversation:
    """Whose message this is, in which conversation, and what came before it."""

    tenant: TenantConfig
    session_id: str
    user_id: str
    question: str
    history: list[Turn]
    remember: bool  # False when the caller keeps the conversation (OpenAI-style requests)
    deadline: float | None = None  # time.monotonic() by which the answer must be complete


@dataclass(kw_only=True)
class Answer:
    """What every kind of answer knows before its first token."""

    conversation: Conversation
    outcome: Outcome
    confidence: float
    grounding: Grounding = NO_GROUNDING
    adapter: str | None = None
    intent: str | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(kw_only=True)
class CachedAnswer(Answer):
    """A cache hit: the stored reply is given again; nothing else runs."""

    reply: ChatReply
    outcome: Outcome = "answered"


@dataclass(kw_only=True)
class FixedAnswer(Answer):
    """A reply given without the model: a standard reply (handover, guardrail, tool failure) or the fallback."""

    text: str


@dataclass(kw_only=True)
class GeneratedAnswer(Answer):
    """A generation already under way: its first chunk has arrived, so start-up errors were clean HTTP errors."""

    first_chunk: GenerationChunk
    rest: AsyncIterator[GenerationChunk]
    fallback_text: str  # given instead when the reply object yields nothing that rests on the knowledge
    decoder: ReplyStreamDecoder | None = None  # structured replies: pulls the response out of the JSON
    cite: bool = False  # the reply must cite the knowledge entries it rests on (entries were shown)
    evidence: list[str] | None = None  # texts its numbers must come from (None: numbers are not checked)
    cache_slot: str | None = None  # where to cache this answer once complete
    # A second, plain-text generation when the first is not an answer's form (a fragment, the wrong language).
    retry: Callable[[Misfit], AsyncIterator[GenerationChunk]] | None = None
    outcome: Outcome = "answered"


def fallback(conversation: Conversation, text: str, intent: str | None) -> FixedAnswer:
    """The configured sentence for a question the knowledge base does not cover (confidence 0)."""
    return FixedAnswer(conversation=conversation, outcome="fallback", confidence=0.0, intent=intent, text=text)
