"""The FastAPI app factory: one app per orchestrator replica, over that replica's pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.adapters.admin import AdapterAdmin
from services.api import admin, chat, console, health, openai_compat, widget
from services.api import control_plane as control_plane_api
from services.api.errors import install_error_handlers
from services.api.health import HealthMonitor
from services.api.hygiene import RequestHygieneMiddleware
from services.api.models import ERROR_RESPONSES, ErrorBody
from services.config import OrchestratorConfig
from services.control_plane.directory import TenantDirectory

if TYPE_CHECKING:
    from services.api.admin import KnowledgeAdmin
    from services.chat.pipeline import ChatPipeline
    from services.control_plane.plane import ControlPlane


class ServedByMiddleware:
    """Adds ``X-Served-By: <replica>`` to every HTTP response.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs the
    app in a task of its own and passes every response, and every streamed chunk, through a
    memory stream; on the orchestrator's hot path that is work for nothing.
    """

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self._app = app
        self._header = (b"x-served-by", replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the header to the response start."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self._header]
            await send(message)

        await self._app(scope, receive, send_with_header)


def create_api(
    config: OrchestratorConfig,
    pipeline: ChatPipeline,
    directory: TenantDirectory,
    check_dependencies: Callable[[], Awaitable[dict[str, str]]],
    *,
    adapter_admin: AdapterAdmin | None = None,
    knowledge: KnowledgeAdmin | None = None,
    control_plane: ControlPlane | None = None,
    served_by: str | None = None,
) -> FastAPI:
    """Build the FastAPI app around one pipeline.

    Args:
        config: Orchestrator settings.
        pipeline: The dialogue pipeline answering chats.
        directory: The tenants and keys served (keys are looked up here by digest).
        check_dependencies: Returns each deployment's health ("ok" or "error: ...").
        adapter_admin: The adapter lifecycle; None when no adapter store is configured.
        knowledge: Syncs a tenant's knowledge source in the running app and reports its state.
        control_plane: Tenants and keys at runtime, records, insights; None without a store.
        served_by: This replica's id, sent as ``X-Served-By`` (tracing a request to a replica).

    """
    docs = config.api_docs  # off in production: the pages map every route, the admin ones included

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        directory.start()  # poll the store from the start, not from the first request
        yield
        # The replica is going away: stop polling and writing, release the store's connections.
        await (control_plane.close() if control_plane is not None else directory.close())

    app = FastAPI(
        lifespan=lifespan,
        title="Customer-service LLM platform",
        version="0.1.0",
        description="Every string of a JSON body must be Unicode text: a lone UTF-16 surrogate (such as "
        "\\ud800) or a NUL character anywhere is a 400 naming the field. A body over its route's limit is a 413, "
        "answered before the body is read or the key checked.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.config = config
    app.state.pipeline = pipeline
    app.state.directory = directory
    app.state.health = HealthMonitor(check_dependencies, config.health_probe_interval_s)
    app.state.adapter_admin = adapter_admin
    app.state.knowledge = knowledge
    app.state.control_plane = control_plane
    install_error_handlers(app)
    # Outermost but for X-Served-By: no route, dependency or model sees a body that breaks the limits.
    app.add_middleware(RequestHygieneMiddleware, limits=config.limits)
    # Outside the hygiene checks: a refused widget request still carries its page's CORS headers.
    app.add_middleware(widget.WidgetCorsMiddleware)
    if served_by:
        app.add_middleware(ServedByMiddleware, replica=served_by)

    app.include_router(chat.router, responses=ERROR_RESPONSES)
    app.include_router(openai_compat.router, responses=ERROR_RESPONSES)
    app.include_router(widget.router, responses=ERROR_RESPONSES)
    app.include_router(console.router)
    app.include_router(health.router)
    app.include_router(admin.router, responses=ERROR_RESPONSES | {409: {"model": ErrorBody}})
    app.include_router(control_plane_api.router, responses=ERROR_RESPONSES | {409: {"model": ErrorBody}})
    return app
