"""Tools per tenant: each calls its own storefront, named and with its credentials; one change per message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.chat.contracts import ChatRequest
from services.chat.pipeline import ChatPipeline
from services.config import OrchestratorConfig, SamplingConfig
from services.schemas import ChatMessage, GenerationChunk, ToolCall
from services.tools import ToolRunner
from tests.conftest import orchestrator_args
from tests.test_pipeline import Retriever

TENANTS = [
    {"tenant": "lumen", "persona": "p", "api_keys": ["lumen-key"]},
    {
        "tenant": "voltmart",
        "persona": "p",
        "api_keys": ["volt-key"],
        "tools": {"storefront_url": "http://volt.shop", "credentials_env": "VOLT_SHOP_TOKEN"},
    },
    {"tenant": "quiet", "persona": "p", "api_keys": ["quiet-key"], "tools": {"enabled": False}},
]


class Shop:
    """Records every request the tools make and answers like a storefront."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.startswith("/tickets"):
            return httpx.Response(201, json={"ticket_id": f"T{len(self.requests)}"})
        return httpx.Response(200, json={"status": "shipped"})


def config(**overrides: Any) -> OrchestratorConfig:
    tools = {"enabled": True, "storefront_url": "http://shared.shop"}
    return OrchestratorConfig.model_validate(orchestrator_args(tenants=TENANTS, tools=tools, **overrides))


@pytest.fixture
def shop(monkeypatch: pytest.MonkeyPatch) -> Shop:
    monkeypatch.setenv("VOLT_SHOP_TOKEN", "volt-secret")
    return Shop()


def runner(shop: Shop, settings: OrchestratorConfig | None = None) -> ToolRunner:
    settings = settings or config()
    return ToolRunner(settings.tools, settings.tenants, transport=httpx.MockTransport(shop))


async def test_each_tenant_calls_its_own_storefront_and_names_itself(shop: Shop) -> None:
    tools = runner(shop)
    lookup = ToolCall(name="get_order_status", arguments={"order_id": "A1"})
    await tools.run(lookup, "shopper-1", "lumen")
    await tools.run(lookup, "shopper-1", "voltmart")
    lumen, volt = shop.requests
    assert (lumen.url.host, lumen.headers["X-CS-Tenant"], "Authorization" in lumen.headers) == (
        "shared.shop",
        "lumen",
        False,
    )
    assert (volt.url.host, volt.headers["X-CS-Tenant"], volt.headers["Authorization"]) == (
        "volt.shop",
        "voltmart",
        "Bearer volt-secret",
    )


async def test_only_calls_that_change_something_carry_the_idempotency_key(shop: Shop) -> None:
    tools = runner(shop)
    ticket = ToolCall(name="create_support_ticket", arguments={"subject": "s", "description": "d"})
    await tools.run(ticket, "shopper-1", "lumen", idempotency_key="k1")
    await tools.run(ToolCall(name="get_order_status", arguments={"order_id": "A1"}), "u", "lumen", "k1")
    assert shop.requests[0].headers["Idempotency-Key"] == "k1"
    assert "Idempotency-Key" not in shop.requests[1].headers


def test_a_tenant_with_tools_off_is_offered_none(shop: Shop) -> None:
    tools = runner(shop)
    assert tools.offered("order_status", "where is A1", "quiet") == []
    assert [t.name for t in tools.offered("order_status", "where is A1", "lumen")] != []


def test_missing_credentials_are_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLT_SHOP_TOKEN", raising=False)
    with pytest.raises(ValueError, match="VOLT_SHOP_TOKEN is not set"):
        runner(Shop())


def test_a_tenant_without_any_storefront_is_refused_by_the_config() -> None:
    tenants = [
        {"tenant": "lumen", "persona": "p"},
        {"tenant": "volt", "persona": "p", "tools": {"storefront_url": "x"}},
    ]
    with pytest.raises(ValueError, match="is set for lumen"):
        OrchestratorConfig.model_validate(orchestrator_args(tenants=tenants, tools={"enabled": True}))


class TwoTickets:
    """Opens two tickets in one round, then answers."""

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        if messages[-1].role == "tool":
            yield GenerationChunk(text="I opened a ticket for you.", finish_reason="stop")
            return
        calls = [
            ToolCall(name="create_support_ticket", arguments={"subject": f"s{n}", "description": "d"}) for n in (1, 2)
        ]
        yield GenerationChunk(text="<tool_call>{}</tool_call>", finish_reason="stop", tool_calls=calls)


async def test_one_message_opens_at_most_one_ticket(shop: Shop) -> None:
    from services.chat.analysis import MessageAnalyzer
    from services.chat.intents import IntentClassifier
    from tests.test_intents import KeywordEmbedder

    settings = config(intents={"examples": {}, "rules": {"complaint": ["ticket"]}})
    analyzer = MessageAnalyzer([], 1.0, KeywordEmbedder(), IntentClassifier(settings.intents))
    chat = ChatPipeline(settings, Retriever(0.1), TwoTickets(), analyzer=analyzer, tools=runner(shop, settings))
    reply = await chat.answer(settings.tenants[0], ChatRequest(user_id="shopper-1", message="Open a ticket please"))
    assert [a["type"] for a in reply.actions] == ["ticket_created"] and len(shop.requests) == 1
    assert shop.requests[0].headers["Idempotency-Key"]


def test_a_retried_message_has_the_same_idempotency_key_and_any_other_message_another() -> None:
    from services.chat.answers import Conversation
    from services.chat.pipeline import _idempotency_key

    lumen = config().tenants[0]

    def key(session: str, message: str, user: str = "shopper-1") -> str:
        return _idempotency_key(Conversation(lumen, session, user, message, [], True))

    assert key("s1", "Open a ticket") == key("s1", "Open a ticket")
    assert (
        len(
            {
                key("s1", "Open a ticket"),
                key("s2", "Open a ticket"),
                key("s1", "Another"),
                key("s1", "Open a ticket", "u2"),
            }
        )
        == 4
    )


async def test_a_message_that_may_need_a_tool_is_never_answered_from_the_cache(shop: Shop) -> None:
    from services.chat.analysis import MessageAnalyzer
    from services.chat.answer_cache import InProcessAnswerCache, cache_key
    from services.chat.contracts import ChatReply
    from services.chat.intents import IntentClassifier
    from services.config import AnswerCacheConfig
    from tests.test_intents import KeywordEmbedder
    from tests.test_tools import ToolCallingGenerator

    async def version(tenant: str) -> int:
        return 1

    settings = config(intents={"examples": {}, "rules": {"order_status": ["order"]}})
    analyzer = MessageAnalyzer([], 1.0, KeywordEmbedder(), IntentClassifier(settings.intents))
    cache = InProcessAnswerCache(AnswerCacheConfig())
    chat = ChatPipeline(
        settings, Retriever(0.1), ToolCallingGenerator(), analyzer=analyzer, tools=runner(shop, settings),
        cache=cache, knowledge_version=version,
    )  # fmt: skip
    question = "Where is my order LH-1001?"
    # Some earlier answer to these words is in the cache (given when no tool was offered, say).
    stale = ChatReply(response="It shipped last week.", confidence=0.9, sources=[], session_id="old")
    await cache.put(cache_key("lumen", 1, None, question), stale)
    for user in ("shopper-1", "shopper-2"):
        reply = await chat.answer(settings.tenants[0], ChatRequest(user_id=user, message=question))
        assert not reply.cached and reply.response != stale.response
    assert [r.url.params["user_id"] for r in shop.requests] == ["shopper-1", "shopper-2"]  # each looked up live
