"""OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Any OpenAI client library talks to a tenant's assistant: the API key picks the tenant,
``model`` names its assistant (the tenant id), and the reply is the same grounded,
brand-voiced answer ``/v1/chat`` gives. OpenAI requests carry the whole conversation, so
the earlier messages are the history and nothing is kept server-side. The platform's own
fields (confidence, sources, actions, adapter) ride along under ``cs`` in a completion and
in the last chunk of a stream; OpenAI clients ignore them, ours can read them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.api.auth import Caller, require_same_tenant
from services.api.errors import error_detail
from services.api.models import ErrorBody
from services.chat.contracts import ChatReply, ChatRequest
from services.config import TenantConfig
from services.errors import InvalidRequestError, NotFoundError, ServiceError
from services.sessions import Turn

if TYPE_CHECKING:
    from services.chat.pipeline import ChatPipeline, ReplyStream

router = APIRouter(prefix="/v1", tags=["openai-compatible"])


class OpenAIMessage(BaseModel):
    """One message; content may be a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class CompletionRequest(BaseModel):
    """The fields of an OpenAI chat-completion request the assistant uses; others are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="The tenant's assistant: its tenant id (see GET /v1/models).")
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    user: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The shopper's id; without it no tool acts (order status, tickets, handover stay off).",
    )


def _assistant(caller: TenantConfig, model: str, request: Request) -> None:
    if model not in request.app.state.directory.tenant_ids:
        raise NotFoundError(f"model {model!r} does not exist; GET /v1/models lists yours")
    require_same_tenant(caller, model)


def _split(messages: list[OpenAIMessage]) -> tuple[list[Turn], str]:
    """Earlier (user, assistant) pairs and the last user message.

    System messages are ignored: the tenant's persona and grounding rules are the system
    prompt, and a caller cannot replace them.
    """
    if messages[-1].role != "user" or not messages[-1].text().strip():
        raise InvalidRequestError("messages: the last message must be a non-empty user message")
    turns: list[Turn] = []
    pending: str | None = None
    for message in messages[:-1]:
        if message.role == "user":
            pending = message.text()
        elif message.role == "assistant" and pending is not None:
            turns.append(Turn(user=pending, assistant=message.text()))
            pending = None
    return turns, messages[-1].text()


def _cs_fields(reply: ChatReply) -> dict[str, Any]:
    return reply.model_dump(mode="json", include={"confidence", "sources", "actions", "adapter"})


def _usage(reply: ChatReply) -> dict[str, int]:
    prompt, completion = (reply.usage.prompt_tokens, reply.usage.completion_tokens) if reply.usage else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.get("/models")
async def models(caller: Caller) -> dict[str, Any]:
    """The caller's assistant, as an OpenAI model list."""
    return {"object": "list", "data": [{"id": caller.tenant, "object": "model", "created": 0, "owned_by": "cs"}]}


@router.post(
    "/chat/completions",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "A chat completion, or chunks when streaming."},
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        404: {"model": ErrorBody},
        422: {"model": ErrorBody},
        503: {"model": ErrorBody},
    },
)
async def chat_completions(body: CompletionRequest, caller: Caller, request: Request) -> Any:
    """Answer the last user message as the tenant's assistant (OpenAI chat-completion format)."""
    _assistant(caller, body.model, request)
    limit = request.app.state.config.limits.max_openai_messages
    if len(body.messages) > limit:
        raise InvalidRequestError(f"messages: {len(body.messages)} messages; the limit is {limit}")
    history, question = _split(body.messages)
    pipeline: ChatPipeline = request.app.state.pipeline
    chat = ChatRequest(user_id=body.user or "openai-client", message=question)
    # Without `user` nobody is the shopper: no tool may act (on orders, tickets) for a shared identity.
    stream = await pipeline.prepare(caller, chat, history=history, tools=body.user is not None)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(
            _chunks(stream, completion_id, created, body.model),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    reply = await stream.reply()
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.response},
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": _usage(reply),
        "cs": _cs_fields(reply),
    }


async def _chunks(stream: ReplyStream, completion_id: str, created: int, model: str) -> AsyncIterator[str]:
    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        } | extra
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        async for item in stream:
            if isinstance(item, ChatReply):
                yield event({}, item.finish_reason, usage=_usage(item), cs=_cs_fields(item))
            else:
                yield event({"content": item})
    except ServiceError as err:
        # Headers are sent: report in-band, as OpenAI's servers do, then end the stream.
        yield f"data: {json.dumps({'error': error_detail(err.code, err.message)})}\n\n"
    yield "data: [DONE]\n\n"
