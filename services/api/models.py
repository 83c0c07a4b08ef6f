"""Bodies of the public REST API that belong to HTTP alone (the chat's contracts are in services.chat)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictBody(BaseModel):
    """Admin request bodies reject unknown fields (their numbers and booleans say strict=True where it matters)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    """What went wrong, for a program and for a person."""

    code: str = Field(description="Machine-readable code, e.g. invalid_request, not_found, payload_too_large.")
    message: str = Field(description="What went wrong, naming the field or the dependency.")
    request_id: str = Field(description="The request's id (its X-Request-Id and the request_id of its log lines).")


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx reply."""

    error: ErrorDetail


def _error(description: str) -> dict[str, object]:
    return {"model": ErrorBody, "description": description}


#: What any route may answer besides its own success, as the OpenAPI document states it.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: _error("Malformed JSON, text that is not text (a lone surrogate or NUL), or a request over a limit."),
    401: _error("Missing or unknown API key."),
    403: _error("A valid key used on another tenant's resource."),
    404: _error("No such resource (or not the caller's)."),
    413: _error("The body is larger than the route's limit."),
    422: _error("A missing, unknown or invalid field."),
    503: _error("A dependency is down or at capacity (Retry-After says when to try again)."),
    504: _error("Not done within the request's time limit."),
}
