"""``POST /v1/chat``: one JSON reply, or Server-Sent Events with ``"stream": true``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from services.api.auth import Caller
from services.api.errors import error_detail
from services.api.models import ErrorBody
from services.chat.contracts import ChatReply, ChatRequest, FeedbackRequest, SessionReply, SessionRequest
from services.config import TenantConfig
from services.errors import ServiceError

if TYPE_CHECKING:
    from services.chat.pipeline import ChatPipeline, ReplyStream

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["chat"])


def sse_event(event: str, payload: object) -> str:
    """One Server-Sent Event; the JSON payload has no newlines, so one data line suffices."""
    return f"event: {event}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(stream: ReplyStream) -> AsyncIterator[str]:
    try:
        async for item in stream:
            if isinstance(item, ChatReply):
                yield sse_event("final", item.model_dump(mode="json"))
            else:
                yield sse_event("delta", {"text": item})
    except ServiceError as err:
        # Headers are sent already: report the failure in-band and end the stream.
        logger.warning("stream failed: %s", err.message)
        yield sse_event("error", {"error": error_detail(err.code, err.message)})


@router.post(
    "/chat",
    response_model=ChatReply,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON reply, or SSE when stream is true."},
        400: {"model": ErrorBody},
        401: {"model": ErrorBody},
        422: {"model": ErrorBody},
        503: {"model": ErrorBody},
    },
)
async def chat(
    body: ChatRequest,
    tenant: Caller,
    request: Request,
) -> ChatReply | StreamingResponse:
    """Answer a shopper's message from the tenant's knowledge base.

    With ``"stream": true`` the reply is ``text/event-stream``: ``delta`` events carry
    ``{"text": ...}`` pieces, one ``final`` event carries the full reply JSON, and an
    ``error`` event replaces it if generation fails after streaming began.
    """
    return await reply_to(request.app.state.pipeline, tenant, body)


async def reply_to(pipeline: ChatPipeline, tenant: TenantConfig, body: ChatRequest) -> ChatReply | StreamingResponse:
    """The reply to one message: JSON, or Server-Sent Events when ``body.stream`` (the chat and widget routes)."""
    if not body.stream:
        return await pipeline.answer(tenant, body)
    stream = await pipeline.prepare(tenant, body)
    return StreamingResponse(
        _events(stream),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/sessions", status_code=201, responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})
async def open_session(body: SessionRequest, tenant: Caller, request: Request) -> SessionReply:
    """Open a conversation for a shopper: its id, issued to that shopper of the caller's tenant.

    Optional: a first message without ``session_id`` opens one too. Only this shopper can
    continue it; the id presented with another ``user_id`` is a 404.
    """
    pipeline: ChatPipeline = request.app.state.pipeline
    return SessionReply(session_id=pipeline.open_session(tenant, body.user_id), user_id=body.user_id)


@router.post("/feedback", status_code=204, responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}})
async def feedback(body: FeedbackRequest, tenant: Caller, request: Request) -> Response:
    """Record whether a reply helped and whether the issue was resolved (feeds the feedback metrics).

    The reply must be one of the recent replies (``session.max_turns``) of a session issued
    to ``user_id``.
    """
    pipeline: ChatPipeline = request.app.state.pipeline
    await pipeline.feedback(tenant, body)
    return Response(status_code=204)
