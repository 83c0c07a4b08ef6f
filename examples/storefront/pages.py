"""The shop's web pages: a product page embedding the chat widget, and the endpoint that signs its shopper's token.

A real storefront knows its logged-in shopper from its session; this one takes a demo
login (``/login?as=shopper-2`` sets the ``shopper`` cookie; ``shopper-1`` otherwise). The
token endpoint signs a short-lived JWT for that shopper with the tenant's widget secret,
which only this backend and the platform hold: the page gets the token, never a key.
"""

from __future__ import annotations

import html

from fastapi import Cookie, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, RedirectResponse

from services.widget_tokens import sign_shopper_token

PRODUCTS = {
    "LH-LINEN-01": (
        "Washed linen duvet cover 水洗亚麻被套",
        "Soft, breathable linen in three colours. 柔软透气的水洗亚麻，三色可选。",
        "399",
    ),
}
TOKEN_TTL_S = 600


def add_shop_pages(app: FastAPI, tenant: str, app_url: str, widget_secret: str | None) -> None:
    """Add ``/products/<sku>``, ``/login`` and ``POST /chat-token`` to the storefront app."""

    @app.get("/login")
    def login(as_: str = Query("shopper-1", alias="as"), sku: str = "LH-LINEN-01") -> RedirectResponse:
        response = RedirectResponse(f"/products/{sku}", status_code=303)
        response.set_cookie("shopper", as_, httponly=True, samesite="lax")
        return response

    @app.post("/chat-token")
    def chat_token(shopper: str = Cookie("shopper-1")) -> dict[str, str]:
        if widget_secret is None:
            raise HTTPException(503, "the chat widget is not configured: start the shop with --widget-secret-env")
        return {"token": sign_shopper_token(widget_secret, tenant, shopper, ttl_s=TOKEN_TTL_S)}

    @app.get("/products/{sku}", response_class=HTMLResponse)
    def product(sku: str, lang: str = "zh") -> str:
        if sku not in PRODUCTS:
            raise HTTPException(404, f"no product {sku}")
        name, blurb, price = (html.escape(v) for v in PRODUCTS[sku])
        script = html.escape(f"{app_url.rstrip('/')}/widget/widget.js")
        language = "zh" if lang.startswith("zh") else "en"
        return f"""<!doctype html>
<html lang="{"zh-CN" if language == "zh" else "en"}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{name} · Lumen Home</title>
<style>body{{font:15px/1.6 system-ui,sans-serif;margin:24px;max-width:960px}}
main{{display:flex;gap:32px;flex-wrap:wrap}}
.product{{flex:1;min-width:280px}}.price{{font-size:20px;color:#a30}}</style></head>
<body><header><h1>Lumen Home 流明家居</h1></header>
<main><section class="product"><h2>{name}</h2><p>{blurb}</p><p class="price">¥{price}</p></section>
<aside><div id="cs-chat"></div></aside></main>
<script src="{script}" data-tenant="{html.escape(tenant)}" data-token-url="/chat-token"
        data-container="cs-chat" data-lang="{language}" defer></script>
</body></html>"""
