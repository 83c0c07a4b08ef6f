"""Bodies of the public REST API that belong to HTTP alone (the chat's contracts are in services.chat)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    """What went wrong, for a program and for a person."""

    code: str = Field(description="Machine-readable code, e.g. invalid_request, not_found, payload_too_large.")
    message: str = Field(description="What went wrong, naming the field or the dependency.")
    request_id: str = Field(description="The request's id (its X-Request-Id and the request_id of its log lines).")


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx reply."""

    error: ErrorDetail
