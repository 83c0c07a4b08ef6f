"""``/console``: the operators' web console, served from the package (no CDN, works offline).

One static page and its script: it logs in with an operator key or the platform admin key
(kept in the tab's sessionStorage), asks ``/admin/whoami`` what that key is, and shows only
the pages it may use. Every action goes through the same JSON API, whose scopes decide what
a key can see or change; the console adds no rights of its own.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Response
from fastapi import Path as PathParam

router = APIRouter(tags=["console"], include_in_schema=False)

_TYPES = {"js": "text/javascript", "css": "text/css"}


def _asset(name: str) -> bytes:
    return (resources.files("services.api") / "static" / "console" / name).read_bytes()


@router.get("/console")
async def console_page() -> Response:
    """The console's page."""
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/console/{name}")
async def console_asset(name: Annotated[str, PathParam(pattern=r"^console\.(js|css)$")]) -> Response:
    """The console's script and style sheet."""
    return Response(_asset(name), media_type=_TYPES[name.rsplit(".", 1)[1]], headers={"Cache-Control": "no-cache"})
