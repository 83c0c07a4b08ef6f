"""The public REST API of the platform, built per orchestrator replica by :func:`create_api`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI

from services.api import chat, health
from services.api.auth import ApiKeyAuth
from services.api.errors import install_error_handlers
from services.config import OrchestratorConfig

if TYPE_CHECKING:
    from services.orchestrator import ChatPipeline


def create_api(
    config: OrchestratorConfig,
    pipeline: ChatPipeline,
    auth: ApiKeyAuth,
    check_dependencies: Callable[[], Awaitable[dict[str, str]]],
) -> FastAPI:
    """Build the FastAPI app around one pipeline.

    Args:
        config: Orchestrator settings.
        pipeline: The dialogue pipeline answering chats.
        auth: API key to tenant mapping.
        check_dependencies: Returns each deployment's health ("ok" or "error: ...").

    """
    app = FastAPI(title="Customer-service LLM platform", version="0.1.0")
    app.state.config = config
    app.state.pipeline = pipeline
    app.state.auth = auth
    app.state.check_dependencies = check_dependencies
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(health.router)
    return app
