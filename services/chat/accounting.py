"""The per-request record: the request's span, clock, usage and how generation ended.

One record per request, owned by its reply stream, which closes it exactly once: when the
reply is complete, when the stream fails, or when the client leaves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.chat.answers import Answer, CachedAnswer
from services.chat.contracts import ChatReply, Usage
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

    def close(self, outcome: str, answer: Answer | None = None, reply: ChatReply | None = None) -> None:
        """Count the request (``cs_requests``, ``cs_request_seconds``), end its span and log it; once only.

        No message text is logged here (see ``observability.logs``).
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
