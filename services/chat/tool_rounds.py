"""The tool-calling loop: up to ``tools.max_rounds`` rounds of calls and results before the answer.

Calls are executed with the shopper's id from the authenticated request, never the model's.
A text answer in a round is streamed as it comes (a tool call is recognized by its opening
tag), so shoppers wait no longer for answers that need no tool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from services.chat.clients import AnswerGenerator
from services.config import SamplingConfig, TenantConfig, ToolConfig, ToolsConfig
from services.errors import GenerationError
from services.schemas import ChatMessage, GenerationChunk, ToolCall
from services.tools import ToolRunner, forced_call_schema, function_spec

logger = logging.getLogger(__name__)

TOOL_CONFIDENCE = 0.9
"""Confidence of an answer backed by a successful tool call (live data from a system of record)."""

TOOL_CALL_TAG = "<tool_call>"


ONE_CHANGE = "only one change (such as a ticket) per message: this call was not made"


@dataclass
class RoundsResult:
    """How the rounds ended.

    ``text`` is set when the model answered in text during a round (then the answer is that
    stream); ``stopped_by`` when a tool failed or the conversation was handed over (then a
    standard reply follows); neither when the answer is still to be generated from the
    messages (extended by the calls and results so far; a call that did not parse adds nothing).
    """

    actions: list[dict[str, Any]] = field(default_factory=list)
    tool_answered: bool = False  # a system of record answered: as sure as the knowledge base, or more
    text: AsyncIterator[GenerationChunk] | None = None
    stopped_by: Literal["tool_failure", "handoff"] | None = None


class ToolRounds:
    """Runs the rounds for one request against a generator and the tool runner."""

    def __init__(
        self, config: ToolsConfig, answer_sampling: SamplingConfig, generator: AnswerGenerator, runner: ToolRunner
    ):
        self._config = config
        self._generator = generator
        self._runner = runner
        # The answer's sampling with room for a tool call (JSON) in the budget.
        budget = max(answer_sampling.max_tokens, config.max_call_tokens)
        self._sampling = answer_sampling.model_copy(update={"max_tokens": budget})

    def offered(self, intent: str | None, message: str, tenant: TenantConfig) -> list[ToolConfig]:
        """The tools offered for this tenant's message (by intent or message pattern), as its profile is now."""
        self._runner.know(tenant)
        return self._runner.offered(intent, message, tenant.tenant)

    async def run(
        self,
        messages: list[ChatMessage],
        offered: list[ToolConfig],
        *,
        adapter: str | None,
        tenant: str,
        user_id: str,
        intent: str | None,
        deadline: float | None = None,
        idempotency_key: str | None = None,
    ) -> RoundsResult:
        """Let the model call tools, appending its calls and their results to ``messages``.

        At most one call that changes something (a ticket) runs per message, sent with
        ``idempotency_key`` (the same for the same message in the same conversation, so a
        retried request opens no second ticket); a further one gets an error result.
        """
        changed = False
        specs = [function_spec(t) for t in offered]
        required = self._runner.required(intent)
        result = RoundsResult()
        for round_no in range(self._config.max_rounds):
            forced = required if round_no == 0 else None
            if forced is not None:
                text = await self._collect(messages, adapter, forced_call_schema(forced), tenant, deadline)
                calls = forced_call(text)
                text = f"{TOOL_CALL_TAG}\n{text}\n</tool_call>"
            else:
                stream = aiter(
                    self._generator.stream(
                        messages, self._sampling, adapter, tools=specs, tenant=tenant, deadline=deadline
                    )
                )
                head, opening = await _opening(stream)
                if not opening.lstrip().startswith(TOOL_CALL_TAG):
                    result.text = _chain(head, stream)  # a text answer: streamed as it comes
                    return result
                text, calls = await _drain(head, stream)
            if not calls:
                # The model opened a call that does not parse (broken or cut-off JSON): its markup
                # must never reach the shopper, so the answer is generated without tools.
                logger.warning("tool round %d: the model's tool call did not parse; answering without tools", round_no)
                return result
            messages.append(ChatMessage(role="assistant", content=text))
            for call in calls:
                if self._runner.changes_something(call):
                    if changed:
                        messages.append(ChatMessage(role="tool", content=json.dumps({"error": ONE_CHANGE})))
                        continue
                    changed = True
                outcome = await self._runner.run(call, user_id, tenant, idempotency_key)
                result.actions.append(outcome.action)
                messages.append(ChatMessage(role="tool", content=outcome.content))
                if not outcome.ok:
                    result.stopped_by = "tool_failure"
                    return result
                if outcome.action["type"] == "handoff":
                    result.stopped_by = "handoff"
                    return result
            result.tool_answered = True
            if forced is not None:
                # A model that must be told which tool to call tends to answer the next round
                # with another call in plain JSON (seen with the 0.5B model): answer without tools.
                return result
        return result

    async def _collect(
        self,
        messages: list[ChatMessage],
        adapter: str | None,
        json_schema: dict[str, Any],
        tenant: str,
        deadline: float | None,
    ) -> str:
        """One whole structured generation's text."""
        parts = [
            chunk.text
            async for chunk in self._generator.stream(
                messages, self._sampling, adapter, json_schema=json_schema, tenant=tenant, deadline=deadline
            )
        ]
        return "".join(parts)


def forced_call(text: str) -> list[ToolCall]:
    """The call in a structured-output generation (``{"name": ..., "arguments": {...}}``)."""
    try:
        # strict=False: a small model may put control characters inside strings.
        data = json.loads(text, strict=False)
        return [ToolCall(name=data["name"], arguments=data.get("arguments") or {})]
    except (ValueError, KeyError, TypeError) as err:
        # Structured output guarantees the schema unless the token budget cut the JSON short.
        raise GenerationError(f"the model's forced tool call is not complete JSON: {text[:200]!r}") from err


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


async def _drain(head: list[GenerationChunk], rest: AsyncIterator[GenerationChunk]) -> tuple[str, list[ToolCall]]:
    """The whole round's text and the calls the LLM deployment parsed from it (on the last chunk)."""
    calls: list[ToolCall] = []
    parts: list[str] = []
    async for chunk in _chain(head, rest):
        parts.append(chunk.text)
        calls = chunk.tool_calls or calls
    return "".join(parts), calls


async def _chain(head: list[GenerationChunk], rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk
