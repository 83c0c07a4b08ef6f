"""The per-request record: the request's span, clock, usage and how generation ended.

One record per request, owned by its reply stream, which closes it exactly once: when the
reply is complete, when the stream fails, or when the client leaves. Closing hands the
reply to the conversation recorder (when the control plane is on), which queues it and
returns at once: the store is written off the hot path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from services.chat.answers import Answer, CachedAnswer
from services.chat.contracts import ChatReply, Usage
from services.config import TenantConfig
from services.control_plane.recorder import ConversationRecorder, record_outcome
from services.control_plane.store import NewRecord
from services.observability.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    """Mutable bookkeeping of one chat request."""

    tenant: str
    metrics: Metrics
    span: Span | None = None
    started: float = field(default_factory=time.monotonic)
    usage: Usage | None = None
    finish_reason: str = "stop"
    withheld: str | None = None  # why a generated answer was replaced by the fallback (cs_withheld_replies)
    retried: str | None = None  # why a generated answer was asked for again (cs_reply_retries)
    closed: bool = False
    recorder: ConversationRecorder | None = None
    profile: TenantConfig | None = None  # the tenant as it was served, for redaction
    user_id: str = ""
    question: str = ""
    vector: list[float] | None = None  # the message's embedding, kept for an unanswered question

    def close(
        self, outcome: str, answer: Answer | None = None, reply: ChatReply | None = None, *, status: int = 200
    ) -> None:
        """Count the request (``cs_requests``, ``cs_request_seconds``), end its span and log it; once only.

        No message text is logged here (see ``observability.logs``). A request refused for
        what the caller sent (``status`` below 500) is counted but not recorded.
        """
        if self.closed:
            return
        self.closed = True
        seconds = time.monotonic() - self.started
        tags = {"tenant": self.tenant, "outcome": outcome}
        self.metrics.inc("cs_requests", tags)
        if self.withheld is not None:
            self.metrics.inc("cs_withheld_replies", {"tenant": self.tenant, "reason": self.withheld})
        if self.retried is not None:
            self.metrics.inc("cs_reply_retries", {"tenant": self.tenant, "reason": self.retried})
        self.metrics.observe("cs_request_seconds", seconds, tags)
        details: dict[str, Any] = {"tenant": self.tenant, "outcome": outcome, "duration_ms": round(seconds * 1000, 1)}
        details |= {k: v for k, v in (("withheld", self.withheld), ("retried", self.retried)) if v is not None}
        if answer is not None:
            cached = isinstance(answer, CachedAnswer)
            details |= {"intent": answer.intent, "adapter": answer.adapter, "cached": cached}
            details["sources"] = len(answer.grounding.chunks)
            if self.usage is not None:
                details |= {
                    "prompt_tokens": self.usage.prompt_tokens,
                    "completion_tokens": self.usage.completion_tokens,
                }
        if reply is not None:
            details |= {"reply_id": reply.reply_id, "confidence": reply.confidence}
        if self.span is not None:
            self.span.set_attributes({k: v for k, v in details.items() if v is not None and k != "duration_ms"})
            self.span.end()
        logger.info("chat request %s", outcome, extra=details)
        refused = outcome == "error" and status < 500
        if self.recorder is not None and self.profile is not None and outcome != "cancelled" and not refused:
            self._record(outcome, answer, reply, seconds)

    def _record(self, outcome: str, answer: Answer | None, reply: ChatReply | None, seconds: float) -> None:
        session_id = reply.session_id if reply else (answer.conversation.session_id if answer else None)
        assert self.recorder is not None and self.profile is not None
        self.recorder.record(
            self.profile,
            NewRecord(
                reply_id=reply.reply_id if reply else f"error-{time.time_ns():x}",
                tenant=self.tenant,
                user_hash=self.recorder.user_hash(self.tenant, self.user_id),
                session_id=session_id,
                question=self.question,
                answer=reply.response if reply else "",
                sources=[s.model_dump() for s in reply.sources] if reply else [],
                confidence=reply.confidence if reply else 0.0,
                intent=reply.intent if reply else (answer.intent if answer else None),
                outcome=record_outcome(reply.outcome, reply.actions) if reply else "error",
                adapter=reply.adapter if reply else None,
                cached=reply.cached if reply else False,
                latency_ms=round(seconds * 1000, 1),
                created_at=datetime.now(UTC),
            ),
            self.vector,
        )
