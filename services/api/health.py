"""``GET /healthz``: the health of every deployment, 503 if any is failing."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Report each deployment as ``ok`` or ``error: ...``; 200 only when all are ok."""
    results: dict[str, str] = await request.app.state.check_dependencies()
    healthy = all(state == "ok" for state in results.values())
    body = {"status": "ok" if healthy else "unavailable", "deployments": {"orchestrator": "ok", **results}}
    return JSONResponse(status_code=200 if healthy else 503, content=body)
