"""Bodies over their route's limit are a 413 and JSON holding invalid text a 400, before parsing or auth."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.factory import create_api
from services.api.hygiene import invalid_text_at
from services.chat.contracts import ChatReply
from services.config import OrchestratorConfig
from services.control_plane.directory import TenantDirectory
from tests.conftest import orchestrator_args

KEY = {"X-API-Key": "test-key"}


class CountingPipeline:
    """Answers every chat with "ok" and counts the calls: a refused request never reaches it."""

    def __init__(self) -> None:
        self.calls = 0

    async def answer(self, tenant: Any, request: Any, history: Any = None) -> ChatReply:
        self.calls += 1
        return ChatReply(response="ok", confidence=1.0, sources=[], session_id="s")


@pytest.fixture
def app() -> Iterator[tuple[TestClient, CountingPipeline]]:
    config = OrchestratorConfig.model_validate(orchestrator_args(limits={"max_body_bytes": 4096}))

    async def check() -> dict[str, str]:
        return {}

    pipeline = CountingPipeline()
    directory = TenantDirectory.from_config(config.tenants, admin_keys=["admin"])
    api = create_api(config, pipeline, directory, check)  # type: ignore[arg-type]
    with TestClient(api) as client:
        yield client, pipeline


def test_a_declared_body_over_the_limit_is_a_413_before_the_key_is_checked(app: Any) -> None:
    client, pipeline = app
    reply = client.post("/v1/chat", content=b"{" + b" " * 5000 + b"}", headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and "limit of 4096 bytes" in reply.json()["error"]["message"]
    assert reply.json()["error"]["code"] == "payload_too_large" and pipeline.calls == 0


def test_a_streamed_body_growing_past_the_limit_is_a_413(app: Any) -> None:
    client, pipeline = app

    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "u", "message": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    reply = client.post("/v1/chat", content=chunks(), headers=KEY | {"Content-Type": "application/json"})
    assert reply.status_code == 413 and pipeline.calls == 0


def test_admin_routes_have_their_own_larger_limit(app: Any) -> None:
    client, _ = app
    documents = [{"doc_id": f"d{n}", "title": "t", "text": "x" * 100} for n in range(60)]  # ~8 KB
    reply = client.put(
        "/admin/knowledge/lumen/sources/s",
        json={"complete": True, "documents": documents},
        headers={"X-API-Key": "admin"},
    )
    assert reply.status_code != 413  # (no knowledge store here: what matters is that the size passed)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"user_id": "u", "message": "hi \\ud800 there"}', "message"),
        ('{"user_id": "u\\udfff", "message": "hi"}', "user_id"),
        ('{"user_id": "u", "message": "nul \\u0000 inside"}', "message"),
    ],
)
def test_json_holding_a_lone_surrogate_or_nul_is_a_400_naming_the_field(app: Any, body: str, field: str) -> None:
    client, pipeline = app
    reply = client.post("/v1/chat", content=body.encode(), headers=KEY | {"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"].startswith(f"{field}: not valid text") and pipeline.calls == 0


def test_the_openai_route_names_the_message_that_holds_invalid_text(app: Any) -> None:
    client, _ = app
    body = '{"model": "m", "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\\ud83d"}]}'
    reply = client.post(
        "/v1/chat/completions", content=body.encode(), headers=KEY | {"Content-Type": "application/json"}
    )
    assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("messages[1].content:")


def test_an_escaped_surrogate_pair_is_a_character_and_passes(app: Any) -> None:
    client, pipeline = app
    body = '{"user_id": "u", "message": "thanks \\ud83d\\ude00"}'  # an emoji, escaped as JSON allows
    reply = client.post("/v1/chat", content=body.encode(), headers=KEY | {"Content-Type": "application/json"})
    assert reply.status_code == 200 and pipeline.calls == 1


def test_field_paths_reach_nested_lists_and_keys() -> None:
    assert invalid_text_at({"a": [{"b": "ok"}, {"b": "\ud800"}]}) == "a[1].b"
    assert invalid_text_at({"\x00": 1}) == "body (a field name)"
    assert invalid_text_at({"a": ["fine", 1, None]}) is None


def test_an_openai_request_over_the_message_limit_is_a_400(app: Any) -> None:
    client, _ = app
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 40 + [
        {"role": "user", "content": "and?"}
    ]
    reply = client.post("/v1/chat/completions", json={"model": "lumen", "messages": messages}, headers=KEY)
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "messages: 81 messages; the limit is 64"


def test_a_body_that_is_not_utf8_and_an_unknown_route_answer_in_the_error_shape(app: Any) -> None:
    client, _ = app
    garbled = client.post("/v1/chat", content=b"\xff\xfe\x16", headers=KEY | {"Content-Type": "application/json"})
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "malformed_json"
    missing = client.get("/v1/nowhere", headers=KEY)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_wrong_method_names_every_method_of_the_path(app: Any) -> None:
    client, _ = app
    reply = client.post("/admin/tenants/lumen/adapter/canary/x", headers={"X-API-Key": "admin"})
    wrong = client.patch("/admin/tenants/lumen/adapter/canary", headers={"X-API-Key": "admin"})
    assert reply.status_code == 404
    assert wrong.status_code == 405 and set(wrong.headers["Allow"].split(", ")) == {"PUT", "DELETE"}
