"""A small storefront API: orders, support tickets and coupons, in SQLite.

It stands in for a shop's own backend so the assistant's tools work end to end on a dev
box: ``python -m examples.storefront --port 8100``. Every order lookup is scoped to the
shopper the platform names (``user_id``), as a real storefront must do: an order of
another shopper is "not found". It is the shop of one brand (``tenant``, Lumen by default):
a call naming another tenant (``X-CS-Tenant``, which the platform sends on every tool call)
is refused, so another brand's key can never reach this shop's orders. A ticket sent again
with the same ``Idempotency-Key`` is the same ticket.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

from examples.storefront.pages import add_shop_pages

SEED_ORDERS = [
    ("LH-1001", "shopper-1", "shipped", "SF Express", "2026-11-24"),
    ("LH-1002", "shopper-2", "processing", None, "2026-11-27"),
    ("LH-1003", "shopper-1", "delivered", "JD Logistics", "2026-11-10"),
]
SEED_COUPONS = [
    ("WELCOME50", "50 yuan off orders of 299 yuan or more; new members only; does not stack.", "2026-12-31"),
    ("HOME10", "10% off home textiles; stacks with store-wide discounts.", "2026-12-15"),
]


class TicketIn(BaseModel):
    """A ticket the assistant opens for a shopper."""

    user_id: str = Field(min_length=1, max_length=128)
    subject: str = Field(min_length=1, max_length=120)
    description: str = Field(min_length=1, max_length=2000)


def create_app(
    db_path: Path, tenant: str = "lumen", *, app_url: str = "http://127.0.0.1:8000", widget_secret: str | None = None
) -> FastAPI:
    """The storefront of one tenant's shop over a SQLite file (seeded on first use).

    Its API serves the platform's tools; its product page embeds the chat widget of the
    platform at ``app_url``, whose shopper tokens it signs with ``widget_secret``.
    """
    lock = threading.Lock()
    opened: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> the ticket it opened
    db = sqlite3.connect(db_path, check_same_thread=False)
    db.row_factory = sqlite3.Row
    with lock, db:
        db.execute("CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, user_id TEXT, status TEXT, "
                   "carrier TEXT, eta TEXT)")  # fmt: skip
        db.execute("CREATE TABLE IF NOT EXISTS tickets (ticket_id TEXT PRIMARY KEY, user_id TEXT, subject TEXT, "
                   "description TEXT, status TEXT)")  # fmt: skip
        db.execute("CREATE TABLE IF NOT EXISTS coupons (code TEXT PRIMARY KEY, rules TEXT, expires TEXT)")
        db.executemany("INSERT OR IGNORE INTO orders VALUES (?, ?, ?, ?, ?)", SEED_ORDERS)
        db.executemany("INSERT OR IGNORE INTO coupons VALUES (?, ?, ?)", SEED_COUPONS)

    def this_shop(x_cs_tenant: str | None = Header(None)) -> None:
        if x_cs_tenant is not None and x_cs_tenant != tenant:
            raise HTTPException(403, f"this storefront serves tenant {tenant}, not {x_cs_tenant}")

    app = FastAPI(title="Example storefront", dependencies=[Depends(this_shop)])
    app.state.requests = []  # (method, path, user_id) of every call, for tests and demos
    add_shop_pages(app, tenant, app_url, widget_secret)

    @app.get("/orders/{order_id}")
    def order(order_id: str, user_id: str) -> dict[str, Any]:
        app.state.requests.append(("GET", f"/orders/{order_id}", user_id))
        with lock:
            row = db.execute(
                "SELECT * FROM orders WHERE order_id = ? AND user_id = ?", (order_id.upper(), user_id)
            ).fetchone()
        if row is None:
            raise HTTPException(404, f"no order {order_id} for this shopper")
        return dict(row)

    @app.post("/tickets", status_code=201)
    def open_ticket(ticket: TicketIn, idempotency_key: str | None = Header(None)) -> dict[str, Any]:
        app.state.requests.append(("POST", "/tickets", ticket.user_id))
        with lock, db:
            if idempotency_key is not None and idempotency_key in opened:
                return opened[idempotency_key]
            ticket_id = "T-" + uuid.uuid4().hex[:8].upper()
            db.execute(
                "INSERT INTO tickets VALUES (?, ?, ?, ?, 'open')",
                (ticket_id, ticket.user_id, ticket.subject, ticket.description),
            )
            reply = {"ticket_id": ticket_id, "status": "open"}
            if idempotency_key is not None:
                opened[idempotency_key] = reply
        return reply

    @app.get("/tickets")
    def tickets(user_id: str) -> list[dict[str, Any]]:
        with lock:
            return [dict(r) for r in db.execute("SELECT * FROM tickets WHERE user_id = ?", (user_id,))]

    @app.get("/coupons/{code}")
    def coupon(code: str) -> dict[str, Any]:
        app.state.requests.append(("GET", f"/coupons/{code}", None))
        with lock:
            row = db.execute("SELECT * FROM coupons WHERE code = ?", (code.upper(),)).fetchone()
        if row is None:
            raise HTTPException(404, f"no coupon {code}")
        return dict(row)

    return app
