"""The storefront chat widget: its script, and the chat it calls with a shopper token instead of an API key.

A storefront page embeds ``<script src="<app>/widget/widget.js" data-tenant="lumen"
data-token-url="/chat-token" ...>`` and a container element. The script asks the
storefront's own backend for a short-lived shopper token (:mod:`services.widget_tokens`)
and calls ``POST /v1/widget/<tenant>/chat`` with it. Only the pages of the tenant's
``widget.allowed_origins`` may: CORS headers are given to those origins alone, and a
request from any other origin is a 403. The tenant API key never reaches the browser.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.chat import reply_to
from services.api.models import StrictBody
from services.chat.contracts import SESSION_ID_PATTERN, ChatReply, ChatRequest
from services.config import TENANT_PATTERN, TenantConfig
from services.control_plane.directory import TenantDirectory
from services.errors import AuthenticationError, ForbiddenError, NotFoundError
from services.widget_tokens import MIN_SECRET_BYTES, verify_shopper_token

router = APIRouter(tags=["widget"])

WIDGET_PREFIX = "/v1/widget/"
#: Request headers the widget sends cross-origin (a preflight must allow them).
ALLOWED_HEADERS = "authorization, content-type"


class WidgetMessage(StrictBody):
    """A shopper's message from the widget; who the shopper is comes from the token."""

    message: str = Field(min_length=1, max_length=8000, json_schema_extra={"pattern": r"\S"})
    session_id: str | None = Field(None, min_length=1, max_length=128, pattern=SESSION_ID_PATTERN)
    stream: bool = Field(False, strict=True)


def allowed_origin(directory: TenantDirectory, tenant: str, origin: str | None) -> bool:
    """Whether a page of ``origin`` may call the tenant's widget chat."""
    profile = directory.tenant(tenant)
    return profile is not None and origin is not None and origin.lower() in profile.widget.allowed_origins


class WidgetCorsMiddleware:
    """CORS for ``/v1/widget/<tenant>/...``, per tenant: only its allowed origins get the headers.

    A preflight from an allowed origin is answered here (204); any other request passes
    on, and its response (errors included, so the page can read them) carries
    ``Access-Control-Allow-Origin`` when the origin is allowed.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the tenant's CORS headers; answer allowed preflights."""
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]  # behind a route prefix (Serve's route_prefix, a proxy)
        if scope["type"] != "http" or not path.startswith(WIDGET_PREFIX):
            await self._app(scope, receive, send)
            return
        tenant = path[len(WIDGET_PREFIX) :].split("/", 1)[0]
        origin = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"), None)
        allowed = allowed_origin(scope["app"].state.directory, tenant, origin)
        cors: list[tuple[bytes, bytes]] = []
        if allowed and origin is not None:
            cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":
            headers = [
                *cors,
                (b"access-control-allow-methods", b"POST, OPTIONS"),
                (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
                (b"access-control-max-age", b"600"),
            ]
            await send({"type": "http.response.start", "status": 204 if allowed else 403, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *cors]
            await send(message)

        await self._app(scope, receive, with_cors)


def _widget_tenant(request: Request, tenant: str) -> tuple[TenantConfig, str]:
    """The tenant and its widget secret, once the page's origin is allowed."""
    directory: TenantDirectory = request.app.state.directory
    profile = directory.tenant(tenant)
    if profile is None:
        raise NotFoundError(f"tenant {tenant!r} does not exist")
    secret = os.environ.get(profile.widget.secret_env) if profile.widget.secret_env else None
    if not secret or len(secret.encode()) < MIN_SECRET_BYTES:
        raise ForbiddenError(f"the chat widget is not enabled for tenant {tenant!r}")
    origin = request.headers.get("origin")
    # A browser always names the page's origin on this call; a caller without one holds a token
    # from the storefront's backend, which is what is checked.
    if origin is not None and not allowed_origin(directory, tenant, origin):
        raise ForbiddenError(f"origin {origin!r} may not embed the chat widget of {tenant!r}")
    return profile, secret


@router.post(
    "/v1/widget/{tenant}/chat",
    response_model=ChatReply,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON reply, or SSE when stream is true."}},
)
async def widget_chat(
    tenant: Annotated[str, PathParam(pattern=TENANT_PATTERN)], body: WidgetMessage, request: Request
) -> ChatReply | StreamingResponse:
    """Answer a shopper's message from the widget: ``Authorization: Bearer <shopper token>``, never an API key.

    The shopper is the token's ``sub``; the reply is that of ``POST /v1/chat``.
    """
    profile, secret = _widget_tenant(request, tenant)
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise AuthenticationError("missing widget token: send 'Authorization: Bearer <token>' from the storefront")
    shopper = verify_shopper_token(header[7:].strip(), secret, tenant, profile.widget.max_token_ttl_s)
    chat = ChatRequest(user_id=shopper.user_id, message=body.message, session_id=body.session_id, stream=body.stream)
    return await reply_to(request.app.state.pipeline, profile, chat)


@router.get("/widget/widget.js", response_class=Response, responses={200: {"content": {"text/javascript": {}}}})
async def widget_script() -> Response:
    """The widget's script (no dependencies, shipped in the package)."""
    script = (resources.files("services.api") / "static" / "widget.js").read_bytes()
    return Response(script, media_type="text/javascript", headers={"Cache-Control": "public, max-age=300"})
