"""Health: ``/livez`` (this replica answers) and ``/healthz`` = ``/readyz`` (every deployment is ok).

Readiness is answered from the last probe of the deployments, never by probing on the
caller's request: a probe runs a real embedding, a Milvus call and an engine check, and
during an outage it waits for a timeout. So :class:`HealthMonitor` probes in the
background every ``interval_s`` and ``/healthz`` answers at once from what it saw last,
naming each failing deployment and how old the reading is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

Probe = Callable[[], Awaitable[dict[str, str]]]
"""Each dependency's state: "ok" or "error: ..."."""


class HealthMonitor:
    """Probes the deployments in the background; readers get the last result without waiting on a probe."""

    def __init__(self, probe: Probe, interval_s: float) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._results: dict[str, str] | None = None
        self._checked_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()

    async def reading(self, wait_s: float = 1.0) -> tuple[dict[str, str] | None, float | None]:
        """The last probe's results and their age in seconds; None while the first probe is still running.

        The probing starts on the first reading (inside the replica's event loop), which
        waits at most ``wait_s`` for that first probe.
        """
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._results is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), wait_s)
        age = None if self._checked_at is None else round(time.monotonic() - self._checked_at, 1)
        return self._results, age

    async def _run(self) -> None:
        while True:
            try:
                self._results = await self._probe()
            except Exception as err:  # a broken probe is reported, and the loop goes on
                logger.warning("health probe failed: %s: %s", type(err).__name__, err)
                self._results = {"probe": f"error: {type(err).__name__}"}
            self._checked_at = time.monotonic()
            self._first.set()
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        """Stop probing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@router.get("/livez")
async def livez() -> dict[str, str]:
    """Liveness: this orchestrator replica answers HTTP (no dependency is asked)."""
    return {"status": "ok"}


@router.get("/healthz")
@router.get("/readyz")
async def healthz(request: Request) -> JSONResponse:
    """Readiness: each deployment ``ok`` or ``error: ...`` as last probed; 200 only when all are ok."""
    monitor: HealthMonitor = request.app.state.health
    results, age = await monitor.reading()
    if results is None:
        starting = {"status": "starting", "deployments": {"orchestrator": "ok"}, "checked_s_ago": None}
        return JSONResponse(status_code=503, content=starting)
    healthy = all(state == "ok" for state in results.values())
    body: dict[str, object] = {
        "status": "ok" if healthy else "unavailable",
        "deployments": {"orchestrator": "ok", **results},
        "checked_s_ago": age,
    }
    return JSONResponse(status_code=200 if healthy else 503, content=body)
