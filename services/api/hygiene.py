r"""Request hygiene at the door: body size limits and text that is not text, before parsing or auth.

A plain ASGI middleware, so that no route, dependency or model sees a request that breaks
these rules, and one place states them:

- **Size.** Each body is bounded by its route's limit (public API, admin, adapter
  archive: :class:`~services.config.RequestLimits`). A declared ``Content-Length`` over the
  limit is refused before a byte is read; a body that grows past it while streaming is
  refused as soon as it does. Both are a 413, before authentication and before JSON parsing.
- **Text.** JSON allows escapes such as ``"\ud800"`` that decode to a lone surrogate, which
  is no character at all: tokenizers, Milvus and JSON encoders fail on it later, far from
  the caller. A NUL (``"\u0000"``) breaks C-string storage the same way. Either anywhere
  in a JSON body is a 400 naming the field (``messages[0].content``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import service_error_response
from services.config import RequestLimits
from services.errors import InvalidRequestError, PayloadTooLargeError, ServiceError

# The escapes that may decode to a surrogate (\ud800-\udfff) or NUL; raw UTF-8 cannot hold either.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:[dD][89a-fA-F][0-9a-fA-F]{2}|0000)")


def body_limit(path: str, limits: RequestLimits) -> int:
    """The largest body a route accepts."""
    if path.startswith("/admin/adapters/") and path.endswith("/archive"):
        return limits.max_archive_bytes
    if path.startswith("/admin/"):
        return limits.max_admin_body_bytes
    return limits.max_body_bytes


def invalid_text_at(value: Any, path: str = "") -> str | None:
    """Where in a decoded JSON value a string holds a lone surrogate or NUL (a field path), or None."""
    if isinstance(value, str):
        return (path or "body") if _not_text(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if _not_text(key):
                return f"{path or 'body'} (a field name)"
            if (found := invalid_text_at(item, here)) is not None:
                return found
    if isinstance(value, list):
        for n, item in enumerate(value):
            if (found := invalid_text_at(item, f"{path or 'body'}[{n}]")) is not None:
                return found
    return None


def _not_text(text: str) -> bool:
    # json.loads joins a valid surrogate pair into one character: any surrogate left is lone.
    return any(0xD800 <= ord(c) <= 0xDFFF or c == "\0" for c in text)


class RequestHygieneMiddleware:
    """Refuses over-large bodies (413) and JSON holding invalid text (400) before the app sees them."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self._app = app
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request's body, then pass it on (replayed when it was read here)."""
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self._app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope["path"][len(root) :] if root and scope["path"].startswith(root) else scope["path"]
        limit = body_limit(path, self._limits)
        headers = dict(scope.get("headers", []))
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        if declared > limit:
            await self._refuse(scope, receive, send, _too_large(limit, declared))
            return
        if b"json" not in headers.get(b"content-type", b"application/json"):
            await self._app(scope, _counted(receive, limit), send)  # archives: streamed, counted
            return
        try:
            body, replay = await _read_body(receive, limit)
            _check_text(body)
        except ServiceError as err:
            await self._refuse(scope, receive, send, err)
            return
        await self._app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: ServiceError) -> None:
        await service_error_response(err)(scope, receive, send)


def _too_large(limit: int, size: int | None = None) -> PayloadTooLargeError:
    said = f" ({size} bytes)" if size is not None else ""
    return PayloadTooLargeError(f"request body is larger than this route's limit of {limit} bytes{said}")


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """The whole body (at most ``limit`` bytes), and a ``receive`` that gives it again."""
    parts: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left: the app sees that on its own receive
        size += len(message.get("body", b""))
        if size > limit:
            raise _too_large(limit)
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(parts)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, replay


def _counted(receive: Receive, limit: int) -> Receive:
    """``receive`` that fails once the body passes ``limit`` bytes (the app's read ends in a 413)."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _too_large(limit)
        return message

    return counted


def _check_text(body: bytes) -> None:
    """400 when the JSON body's strings hold a lone surrogate or NUL; a cheap byte scan first."""
    if not _SUSPECT_ESCAPE.search(body):
        return
    try:
        value = json.loads(body)
    except ValueError:
        return  # not JSON: the app's own parsing names the problem
    where = invalid_text_at(value)
    if where is not None:
        raise InvalidRequestError(f"{where}: not valid text (a lone UTF-16 surrogate or a NUL character)")
