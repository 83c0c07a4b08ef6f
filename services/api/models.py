"""Bodies of the public REST API that belong to HTTP alone (the chat's contracts are in services.chat)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx reply."""

    error: dict[str, str] = Field(description="{'code': machine-readable code, 'message': what went wrong}")
