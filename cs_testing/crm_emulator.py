"""A local HTTP server that behaves like a paginated CRM policy API, for tests and benchmarks.

``GET /api/policies`` lists records newest-last, wrapped as ``{"data": [...], "meta": {...}}``.
It pages by ``page``/``page_size``, ``offset``/``limit`` or ``cursor`` (whichever the
request uses), filters by ``updated_since`` (ISO time, inclusive), requires a bearer
token, and can be told to fail the next N requests with 503 (a burst) or to stall.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Query

from cs_testing.cluster import free_port

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class CrmState:
    """What the emulated CRM holds and how it misbehaves."""

    token: str = "crm-secret"
    records: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0
    slow_next: int = 0  # the next N requests answer only after slow_s (a timeout on the client)
    slow_s: float = 0.0
    requests: int = 0
    clock: int = 0

    def put(self, record_id: str, title: str, body: str, **extra: Any) -> dict[str, Any]:
        """Insert or update a record, stamping it with the next modification time."""
        self.clock += 1
        record = {
            "id": record_id,
            "name": title,
            "content": {"body": body},
            "modified": (EPOCH + timedelta(minutes=self.clock)).isoformat(),
            "status": "active",
        } | extra
        self.records = [r for r in self.records if r["id"] != record_id] + [record]
        return record

    def archive(self, record_id: str) -> None:
        """Mark a record archived (a tombstone), as CRMs do instead of deleting."""
        [record] = [r for r in self.records if r["id"] == record_id]
        self.put(record_id, record["name"], record["content"]["body"], status="archived")


def create_crm_app(state: CrmState) -> FastAPI:
    """The emulated CRM API over ``state``."""
    app = FastAPI()

    @app.get("/api/policies")
    def policies(
        authorization: str | None = Header(None),
        updated_since: str | None = None,
        page: int | None = Query(None, ge=1),
        page_size: int = Query(50, ge=1),
        offset: int | None = Query(None, ge=0),
        limit: int = Query(50, ge=1),
        cursor: str | None = None,
    ) -> dict[str, Any]:
        state.requests += 1
        if state.slow_next > 0:
            state.slow_next -= 1
            time.sleep(state.slow_s)  # emulates a stalled backend, not a test synchronization
        if state.fail_next > 0:
            state.fail_next -= 1
            raise HTTPException(503, "maintenance")
        if authorization != f"Bearer {state.token}":
            raise HTTPException(401, "invalid token")
        records = state.records
        if updated_since:
            since = datetime.fromisoformat(updated_since)
            records = [r for r in records if datetime.fromisoformat(r["modified"]) >= since]
        if page is not None:
            start, size = (page - 1) * page_size, page_size
        elif offset is not None:
            start, size = offset, limit
        else:
            start, size = int(cursor or 0), limit
        chunk = records[start : start + size]
        meta: dict[str, Any] = {"total": len(records)}
        if page is None and offset is None:
            meta["next_cursor"] = str(start + size) if start + size < len(records) else None
        return {"data": chunk, "meta": meta}

    return app


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run an ASGI app on a free local port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn's own readiness flag, not a guess
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test HTTP server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
