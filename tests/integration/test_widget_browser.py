"""The storefront chat widget in a real browser (Debian's Chromium, driven by Playwright).

The example storefront's product page embeds the widget of a running app (tiny models);
the widget answers with the shopper token the storefront signs, refuses a forged or an
expired one, shows a handover, and never sends a tenant API key. The screenshots go to
docs/images/, taken by this run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cs_testing.crm_emulator import serve_in_thread
from examples.storefront.app import create_app
from services.widget_tokens import sign_shopper_token
from tests.conftest import REPO_ROOT, WIDGET_SECRET, WIDGET_SECRET_ENV, sample_app

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)"),
]

#: The flags Chromium needs in our sandboxes (../shared/ENVIRONMENT.md).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = REPO_ROOT / "docs" / "images"
API_KEY = "test-key"


@pytest.fixture(scope="module")
def shop(
    ray_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, tiny_llm_dir: Path
) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("widget")
    app_url = f"{ray_cluster['http_url']}/widget-app"
    storefront = create_app(workdir / "shop.db", app_url=app_url, widget_secret=WIDGET_SECRET)
    with serve_in_thread(storefront) as shop_url:
        tenant = {
            "tenant": "lumen",
            "persona": "You are the assistant of Lumen Home.",
            "api_keys": [API_KEY],
            "widget": {"secret_env": WIDGET_SECRET_ENV, "allowed_origins": [shop_url]},
        }
        orchestrator = {"tenants": [tenant], "sampling": {"temperature": 0, "max_tokens": 16}}
        with sample_app(
            "widget-app", ray_cluster["http_url"], workdir, minilm_dir, tiny_llm_dir,
            llm={"max_model_len": 1280}, orchestrator=orchestrator,
        ):  # fmt: skip
            yield shop_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 720}, locale="zh-CN")
    page = context.new_page()
    page.sent = []  # (url, headers) of every request the page made
    page.on("request", lambda request: page.sent.append((request.url, request.headers)))
    page.logged = []  # what the page printed or failed with: the reason a test failed
    page.on("console", lambda message: page.logged.append(message.text))
    page.on("response", lambda r: page.logged.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    yield page
    context.close()


def ask(page: Any, message: str) -> Any:
    """Type a message into the widget and wait for its answer to settle (a final reply or an error note)."""
    before = page.locator(".cs-widget .cs-msg").count()
    page.get_by_role("textbox").fill(message)
    page.keyboard.press("Enter")
    answer = page.locator(".cs-widget .cs-msg").nth(before + 1)
    page.wait_for_function(
        "n => { const m = document.querySelectorAll('.cs-widget .cs-msg')[n];"
        " return m && (m.dataset.outcome || m.classList.contains('cs-note')); }",
        arg=before + 1,
        timeout=120_000,
    )
    return answer


def test_the_widget_answers_with_the_storefronts_shopper_token_and_never_sends_an_api_key(shop: str, page: Any) -> None:
    page.goto(f"{shop}/products/LH-LINEN-01?lang=zh")
    answer = ask(page, "退货政策是什么？")
    outcome = answer.get_attribute("data-outcome")
    assert outcome in {"answered", "fallback"} and answer.inner_text().strip(), (answer.inner_text(), page.logged)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "widget-product-page.png"), full_page=True)
    chats = [(url, headers) for url, headers in page.sent if "/v1/widget/lumen/chat" in url]
    assert chats, "the widget never called the app"
    for url, headers in page.sent:
        assert "x-api-key" not in headers and API_KEY not in headers.get("authorization", ""), url
    token = chats[0][1]["authorization"].removeprefix("Bearer ")
    assert token.count(".") == 2  # a JWT, signed by the storefront


def test_a_handover_is_shown_to_the_shopper(shop: str, page: Any) -> None:
    page.goto(f"{shop}/products/LH-LINEN-01?lang=zh")
    answer = ask(page, "我要转人工")
    assert answer.get_attribute("data-outcome") == "handover"
    assert page.locator(".cs-handover").inner_text() == "已为您转接人工客服，请稍候。"


@pytest.mark.parametrize("kind", ["forged", "expired"])
def test_a_forged_or_expired_token_is_refused(shop: str, page: Any, kind: str) -> None:
    if kind == "forged":
        token = sign_shopper_token("not-the-secret-" * 3, "lumen", "shopper-1")
    else:
        token = sign_shopper_token(WIDGET_SECRET, "lumen", "shopper-1", ttl_s=60, now=time.time() - 3600)
    page.route("**/chat-token", lambda route: route.fulfill(json={"token": token}))
    statuses: list[int] = []
    page.on(
        "response",
        lambda r: statuses.append(r.status) if "/v1/widget/" in r.url and r.request.method == "POST" else None,
    )
    page.goto(f"{shop}/products/LH-LINEN-01?lang=en")
    answer = ask(page, "How long do returns take?")
    assert answer.inner_text() == "Please sign in again to chat."
    assert statuses and set(statuses) == {401}  # refused by the app, then once more with a "fresh" token
