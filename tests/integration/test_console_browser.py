"""The operators' console in a real browser (Debian's Chromium, driven by Playwright), over a running app.

An operator logs in, streams an answer and sees its sources, rates it and finds the rating
in insights, runs a knowledge search test; the admin rolls an adapter back. Each page's
screenshot goes to docs/images/, taken by this run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO_ROOT, sample_app
from tests.integration.test_widget_browser import CHROMIUM_ARGS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium)"),
]

SCREENSHOTS = REPO_ROOT / "docs" / "images"
ADMIN, OPERATOR = "admin-key", "lumen-operator-key"


@pytest.fixture(scope="module")
def console_url(
    ray_cluster: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    minilm_dir: Path,
    tiny_llm_dir: Path,
    adapters_dir: Path,
) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("console")
    store = workdir / "adapters"
    for version, built in (("v1", "brand-a"), ("v2", "brand-b")):
        shutil.copytree(adapters_dir / built, store / "console-voice" / version)
    tenant = {
        "tenant": "lumen", "persona": "You are the assistant of Lumen Home.", "api_keys": ["test-key"],
        "operator_api_keys": [OPERATOR],
    }  # fmt: skip
    orchestrator = {"tenants": [tenant], "admin_api_keys": [ADMIN], "sampling": {"temperature": 0, "max_tokens": 16}}
    with sample_app(
        "console-app", ray_cluster["http_url"], workdir, minilm_dir, tiny_llm_dir,
        llm={"adapters": store, "max_model_len": 1280}, orchestrator=orchestrator,
    ) as url:  # fmt: skip
        admin = {"X-API-Key": ADMIN}
        with httpx.Client(base_url=url, timeout=120) as http:
            for version in ("v1", "v2"):
                registered = http.post(
                    "/admin/adapters/console-voice/versions", json={"version": version}, headers=admin
                )
                assert registered.status_code == 201, registered.text
                body = {"adapter": "console-voice", "version": version}
                assert http.put("/admin/tenants/lumen/adapter", json=body, headers=admin).status_code == 200
        yield f"{url}/console"


@pytest.fixture
def page(console_url: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 860}, locale="en-US").new_page()
        page.on("dialog", lambda dialog: dialog.accept())  # the confirmation step of every change
        page.goto(console_url)
        yield page
        browser.close()


def log_in(page: Any, key: str) -> None:
    page.get_by_label("API key (operator or admin)").fill(key)
    page.get_by_role("button", name="Log in").click()
    page.locator("#tabs [role=tab]").first.wait_for()


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"console-{name}.png"), full_page=True)


def test_an_operator_streams_an_answer_sees_its_sources_and_finds_its_rating_in_insights(page: Any) -> None:
    log_in(page, OPERATOR)
    assert page.locator("#tabs [role=tab]").all_inner_texts() == ["Playground", "Knowledge", "Insights"]
    page.get_by_label("Ask as a shopper").fill("How long does a card refund take?")
    page.get_by_role("button", name="Send").click()
    meta = page.locator(".reply-meta").first
    meta.wait_for(timeout=120_000)
    assert "adapter console-voice@v2" in meta.inner_text() and "outcome answered" in meta.inner_text()
    page.locator(".sources table tbody tr").first.wait_for()
    assert page.locator(".sources table tbody tr").count() >= 1
    shot(page, "playground")
    page.get_by_role("button", name="Not helpful").first.click()
    page.get_by_text("Feedback recorded.").wait_for()

    deadline = time.monotonic() + 30
    while True:  # the record and its feedback are written off the hot path: look again until they are there
        page.get_by_role("tab", name="Insights").click()
        rates = page.locator("#insights table").first
        rates.wait_for()
        cells = rates.locator("tbody td").all_inner_texts()
        if cells[-1] == "1":  # rated
            break
        assert time.monotonic() < deadline, f"the rating never reached insights: {cells}"
    assert cells[4] == "0"  # satisfaction: the one rating was "not helpful"
    assert "How long does a card refund take?" in page.locator("#insights").inner_text()  # among the worst rated
    shot(page, "insights")

    page.get_by_role("tab", name="Knowledge").click()
    state = page.locator("section table").first
    state.wait_for()
    assert state.locator("thead th").all_inner_texts()[:2] == ["source", "documents"]
    assert int(state.locator("tbody tr td").nth(1).inner_text()) > 0  # the sample source's documents
    page.get_by_label("Question").fill("How long does a card refund take?")
    page.get_by_role("button", name="Search test").click()
    page.locator("#search-decision").wait_for()
    decision = page.locator("#search-decision").inner_text()
    assert "answer" in decision and "margin 0." in decision  # the dense candidates' lead the gate compared
    assert page.locator("#search-result table tbody tr").count() >= 1
    shot(page, "knowledge")

    page.get_by_role("button", name="中文").click()
    page.get_by_role("tab", name="对话测试").click()
    shot(page, "playground-zh")


def test_the_admin_rolls_an_adapter_back_after_confirming(page: Any) -> None:
    log_in(page, ADMIN)
    page.get_by_role("tab", name="Adapters").click()
    rollout = page.locator("#rollout")
    rollout.wait_for()
    assert "console-voice@v2" in rollout.inner_text() and "history console-voice@v1" in rollout.inner_text()
    shot(page, "adapters")
    page.get_by_role("button", name="Roll back").click()
    page.wait_for_function("() => document.querySelector('#rollout')?.textContent.includes('console-voice@v1 ·')")
    page.get_by_role("tab", name="Tenants and keys").click()
    page.locator("#keys table").wait_for()
    shot(page, "tenants")


def test_a_storefront_key_cannot_log_in(page: Any) -> None:
    page.get_by_label("API key (operator or admin)").fill("test-key")
    page.get_by_role("button", name="Log in").click()
    page.get_by_text("use an operator or the admin key").wait_for()
    assert page.locator("#tabs").is_hidden()
