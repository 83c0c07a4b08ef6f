"""The storefront widget: shopper tokens (signing, forgery, expiry, audience) and per-tenant origins (CORS)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from services.api.factory import create_api
from services.chat.pipeline import ChatPipeline
from services.config import OrchestratorConfig
from services.control_plane.directory import TenantDirectory
from services.errors import AuthenticationError
from services.widget_tokens import sign_shopper_token, verify_shopper_token
from tests.conftest import orchestrator_args
from tests.test_pipeline import Generator, Retriever

SECRET = "s" * 40
SHOP = "https://shop.lumen.example"


def test_a_signed_token_names_its_shopper() -> None:
    shopper = verify_shopper_token(sign_shopper_token(SECRET, "lumen", "shopper-1"), SECRET, "lumen", 3600)
    assert (shopper.tenant, shopper.user_id) == ("lumen", "shopper-1")


# Tokens are made when the test runs (a token made at collection may expire before its test).
BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "forged": (lambda: sign_shopper_token("x" * 40, "lumen", "shopper-1"), "signature"),  # another secret
    "expired": (lambda: sign_shopper_token(SECRET, "lumen", "shopper-1", ttl_s=60, now=time.time() - 3600), "expired"),
    "other-tenant": (lambda: sign_shopper_token(SECRET, "voltmart", "shopper-1"), "not for tenant 'lumen'"),
    "too-long": (
        lambda: sign_shopper_token(SECRET, "lumen", "shopper-1", ttl_s=7200),
        "longer than this tenant allows",
    ),
    "no-sub": (
        lambda: jwt.encode({"aud": "lumen", "iat": int(time.time()), "exp": int(time.time()) + 60}, SECRET),
        "sub",
    ),
    "no-exp": (lambda: jwt.encode({"sub": "u", "aud": "lumen", "iat": int(time.time())}, SECRET), "exp"),
    "malformed": (lambda: "not.a.token", "invalid widget token"),
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_a_bad_token_is_refused_naming_why(kind: str) -> None:
    make, problem = BAD_TOKENS[kind]
    with pytest.raises(AuthenticationError, match=problem):
        verify_shopper_token(make(), SECRET, "lumen", 3600)


def test_an_unsigned_token_is_refused() -> None:
    unsigned = jwt.encode({"sub": "u", "aud": "lumen", "iat": 1, "exp": 2**31}, key=None, algorithm="none")
    with pytest.raises(AuthenticationError):
        verify_shopper_token(unsigned, SECRET, "lumen", 3600)


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("LUMEN_WIDGET_SECRET", SECRET)
    tenants = [
        {
            "tenant": "lumen",
            "persona": "You are the assistant of Lumen Home.",
            "api_keys": ["test-key"],
            "widget": {"secret_env": "LUMEN_WIDGET_SECRET", "allowed_origins": [SHOP]},
        },
        {"tenant": "quiet", "persona": "No widget."},
    ]
    config = OrchestratorConfig.model_validate(orchestrator_args(tenants=tenants))

    async def healthy() -> dict[str, str]:
        return {}

    pipeline = ChatPipeline(config, Retriever(0.8), Generator())
    with TestClient(create_api(config, pipeline, TenantDirectory.from_config(config.tenants), healthy)) as c:
        yield c


def widget_chat(client: Any, token: str, origin: str = SHOP, tenant: str = "lumen", **body: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Origin": origin}
    return client.post(
        f"/v1/widget/{tenant}/chat", json={"message": "How long do returns take?"} | body, headers=headers
    )


def test_the_widget_chats_as_the_tokens_shopper_and_only_the_allowed_origin_gets_cors(client: Any) -> None:
    reply = widget_chat(client, sign_shopper_token(SECRET, "lumen", "shopper-1"))
    assert reply.status_code == 200 and reply.json()["response"]
    assert reply.headers["access-control-allow-origin"] == SHOP
    again = widget_chat(client, sign_shopper_token(SECRET, "lumen", "shopper-2"), session_id=reply.json()["session_id"])
    assert again.status_code == 404  # another shopper cannot continue this conversation
    elsewhere = widget_chat(client, sign_shopper_token(SECRET, "lumen", "shopper-1"), origin="https://evil.example")
    assert elsewhere.status_code == 403 and "access-control-allow-origin" not in elsewhere.headers


def test_a_preflight_is_answered_for_allowed_origins_only(client: Any) -> None:
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = client.options("/v1/widget/lumen/chat", headers={"Origin": SHOP} | asked)
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == SHOP
    assert "authorization" in ok.headers["access-control-allow-headers"]
    refused = client.options("/v1/widget/lumen/chat", headers={"Origin": "https://evil.example"} | asked)
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def test_a_refused_token_still_reaches_the_page_with_its_reason(client: Any) -> None:
    forged = widget_chat(client, sign_shopper_token("x" * 40, "lumen", "shopper-1"))
    assert forged.status_code == 401 and "signature" in forged.json()["error"]["message"]
    assert forged.headers["access-control-allow-origin"] == SHOP  # the widget can read why


def test_an_api_key_is_no_widget_token_and_a_tenant_without_a_secret_has_no_widget(client: Any) -> None:
    assert widget_chat(client, "test-key").status_code == 401
    assert widget_chat(client, sign_shopper_token(SECRET, "quiet", "u"), tenant="quiet").status_code == 403


def test_the_widget_script_is_served_from_the_package(client: Any) -> None:
    script = client.get("/widget/widget.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "/v1/widget/" in script.text and "Authorization" in script.text and "X-API-Key" not in script.text


def test_allowed_origins_must_be_origins() -> None:
    with pytest.raises(ValueError, match="is not an origin"):
        OrchestratorConfig.model_validate(
            orchestrator_args(tenants=[{"tenant": "t", "persona": "p", "widget": {"allowed_origins": ["shop.com/x"]}}])
        )
