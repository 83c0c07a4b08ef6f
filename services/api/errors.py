"""The one place where errors become HTTP responses."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.errors import ServiceError
from services.observability.logs import serve_request_id

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, retry_after_s: int | None = None) -> JSONResponse:
    """A JSON error body: ``{"error": {"code": ..., "message": ..., "request_id": ...}}``.

    ``request_id`` is Serve's id of the request (also its ``X-Request-Id`` header and the
    ``request_id`` of its log lines), so a caller's report leads to the logs; nothing else
    about the server goes into an error body.
    """
    error = error_detail(code, message)
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(status_code=status, content={"error": error}, headers=headers)


def error_detail(code: str, message: str) -> dict[str, str]:
    """The ``error`` object of a response body or of an SSE ``error`` event."""
    return {"code": code, "message": message, "request_id": serve_request_id() or uuid.uuid4().hex}


def service_error_response(exc: ServiceError) -> JSONResponse:
    """The response of a domain error (its status and code); 5xx are logged."""
    if exc.status_code >= 500:
        logger.warning("%s: %s", exc.code, exc.message)
    return error_response(exc.status_code, exc.code, exc.message, exc.retry_after_s)


_HTTP_CODES = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _methods_of(request: Request) -> list[str]:
    """Every method some route serves at the request's path."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "__none__"})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def describe_validation_error(exc: RequestValidationError) -> tuple[int, str, str]:
    """Status, code and a one-line message naming the first invalid field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return (
            400,
            "malformed_json",
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
        )
    location = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "field required"
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, "invalid_request", f"{location}: {message}{more}"


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and anything unexpected to JSON responses."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's and Starlette's own refusals (a body that is not UTF-8, an unknown route, a
        # wrong method) in the same shape as every other error.
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = "request body is not valid JSON (not UTF-8 text)" if code == "malformed_json" else str(exc.detail)
        response = error_response(exc.status_code, code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            # Starlette names only the first route of the path; a path served by several
            # routes (PUT and DELETE of one resource) supports all their methods.
            response.headers["Allow"] = ", ".join(_methods_of(request))
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(*describe_validation_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__})")
