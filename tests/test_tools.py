"""Tools against the example storefront over real HTTP, and tool rounds in the pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from cs_testing.cluster import free_port
from cs_testing.crm_emulator import serve_in_thread
from examples.storefront.app import create_app
from services.chat.contracts import ChatRequest
from services.chat.pipeline import ChatPipeline
from services.config import OrchestratorConfig, SamplingConfig, ToolsConfig
from services.schemas import ChatMessage, GenerationChunk, ToolCall
from services.tools import ToolRunner, forced_call_schema
from tests.conftest import orchestrator_args
from tests.test_pipeline import Retriever


@pytest.fixture(scope="module")
def storefront(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FastAPI]]:
    app = create_app(tmp_path_factory.mktemp("shop") / "shop.db")
    with serve_in_thread(app) as url:
        yield url, app


def tools_config(url: str) -> dict[str, Any]:
    """Default tools; get_order_status is also offered for messages naming an LH- order."""
    definitions = [t.model_dump() for t in ToolsConfig().definitions]
    definitions[0]["patterns"] = [r"LH-\d+"]
    return {"enabled": True, "storefront_url": url, "definitions": definitions}


def runner(url: str) -> ToolRunner:
    return ToolRunner(ToolsConfig(enabled=True, storefront_url=url))


async def test_order_lookup_uses_the_authenticated_shopper(storefront: tuple[str, FastAPI]) -> None:
    url, app = storefront
    own = await runner(url).run(ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"}), "shopper-1")
    assert own.ok and own.action == {"type": "order_status", "order_id": "LH-1001", "status": "shipped"}
    # The model (or a prompt injection) names another shopper: the argument is dropped.
    sneaky = ToolCall(name="get_order_status", arguments={"order_id": "LH-1002", "user_id": "shopper-2"})
    other = await runner(url).run(sneaky, "shopper-1")
    assert other.ok and '"error": "not found"' in other.content and "processing" not in other.content
    assert app.state.requests[-1] == ("GET", "/orders/LH-1002", "shopper-1")


async def test_tickets_and_handover_become_actions(storefront: tuple[str, FastAPI]) -> None:
    url, _ = storefront
    call = ToolCall(name="create_support_ticket", arguments={"subject": "Broken lamp", "description": "Arrived broken"})
    ticket = await runner(url).run(call, "shopper-1")
    assert ticket.ok and ticket.action["type"] == "ticket_created" and str(ticket.action["ticket_id"]).startswith("T-")
    human = await runner(url).run(ToolCall(name="transfer_to_human", arguments={"reason": "refund dispute"}), "u")
    assert human.action == {"type": "handoff", "reason": "refund dispute"}


async def test_bad_arguments_and_outages_fail_clearly(storefront: tuple[str, FastAPI]) -> None:
    bad = await runner(storefront[0]).run(ToolCall(name="get_order_status", arguments={}), "shopper-1")
    assert not bad.ok and bad.action["type"] == "tool_failed" and "'order_id' is a required property" in bad.content
    down = await runner(f"http://127.0.0.1:{free_port()}").run(
        ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"}), "shopper-1"
    )
    assert not down.ok and "unreachable" in down.action["message"]


def test_forced_call_schema_admits_exactly_one_call_of_the_tool() -> None:
    import jsonschema

    tool = ToolsConfig().definitions[0]
    schema = forced_call_schema(tool)
    jsonschema.validate({"name": "get_order_status", "arguments": {"order_id": "A1"}}, schema)
    for wrong in (
        {"name": "other", "arguments": {"order_id": "A1"}},
        {"name": "get_order_status", "arguments": {"order_id": "A1", "user_id": "x"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


class ToolCallingGenerator:
    """Calls get_order_status first, then answers from the tool result."""

    def __init__(self) -> None:
        self.calls: list[list[ChatMessage]] = []

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        self.calls.append(list(messages))
        if messages[-1].role == "tool":
            yield GenerationChunk(text="Your order has shipped.", finish_reason="stop")
            return
        call = ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"})
        yield GenerationChunk(text='<tool_call>{"name": "get_order_status"}</tool_call>', finish_reason="stop",
                              tool_calls=[call])  # fmt: skip


async def test_tool_results_go_back_to_the_model_and_into_the_actions(storefront: tuple[str, FastAPI]) -> None:
    url, _ = storefront
    config = OrchestratorConfig.model_validate(orchestrator_args(tools=tools_config(url)))
    generator = ToolCallingGenerator()
    chat = ChatPipeline(config, Retriever(0.1), generator, tools=ToolRunner(config.tools))
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="shopper-1", message="Where is LH-1001?"))
    assert reply.response == "Your order has shipped."
    assert reply.actions == [{"type": "order_status", "order_id": "LH-1001", "status": "shipped"}]
    assert reply.confidence == 0.9  # backed by the storefront, although the knowledge base had nothing
    tool_message = generator.calls[-1][-1]
    assert tool_message.role == "tool" and '"status": "shipped"' in tool_message.content


async def test_a_failing_tool_gives_the_standard_reply(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    config = OrchestratorConfig.model_validate(orchestrator_args(tools=tools_config(down)))
    chat = ChatPipeline(config, Retriever(0.1), ToolCallingGenerator(), tools=ToolRunner(config.tools))
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="shopper-1", message="Where is LH-1001?"))
    assert reply.response.startswith("Sorry, I couldn't reach our order system")
    assert reply.actions[0]["type"] == "tool_failed"


def test_only_relevant_tools_are_offered() -> None:
    tools = ToolRunner(ToolsConfig(enabled=True, storefront_url="http://shop"))
    assert [t.name for t in tools.offered("policy_question", "How long do refunds take?")] == []
    assert [t.name for t in tools.offered("policy_question", "Can I stack the WELCOME50 coupon?")] == [
        "check_coupon_rules"
    ]
    assert {t.name for t in tools.offered("order_status", "Where is my parcel?")} == {
        "get_order_status", "create_support_ticket"
    }  # fmt: skip
    assert ToolRunner(ToolsConfig()).offered("order_status", "x") == []  # tools disabled


class BrokenCallGenerator:
    """Opens a native tool call whose JSON is cut off, then answers in text when asked without tools."""

    def __init__(self) -> None:
        self.tools_offered: list[bool] = []

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        self.tools_offered.append(bool(kwargs.get("tools")))
        if kwargs.get("tools"):
            yield GenerationChunk(text='<tool_call>\n{"name": "get_order_status", "argum')
            yield GenerationChunk(text="", finish_reason="length", tool_calls=None)
            return
        yield GenerationChunk(text="Please give me your order number.", finish_reason="stop")


async def test_a_tool_call_that_does_not_parse_never_reaches_the_shopper(storefront: tuple[str, FastAPI]) -> None:
    config = OrchestratorConfig.model_validate(
        orchestrator_args(tools=tools_config(storefront[0]), structured_replies=False)
    )
    generator = BrokenCallGenerator()
    chat = ChatPipeline(config, Retriever(0.1), generator, tools=ToolRunner(config.tools))
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="shopper-1", message="Where is LH-1001?"))
    assert "<tool_call>" not in reply.response and reply.response == "Please give me your order number."
    assert generator.tools_offered == [True, False] and reply.actions == []


async def test_a_caller_that_names_no_shopper_gets_no_tool_call(storefront: tuple[str, FastAPI]) -> None:
    url, _ = storefront
    config = OrchestratorConfig.model_validate(orchestrator_args(tools=tools_config(url)))
    generator = ToolCallingGenerator()
    chat = ChatPipeline(config, Retriever(0.1), generator, tools=ToolRunner(config.tools))
    question = ChatRequest(user_id="openai-client", message="Where is LH-1001?")
    reply = await chat.answer(config.tenants[0], question, history=[], tools=False)
    assert reply.actions == [] and reply.outcome == "fallback"  # nothing to answer from, and no tool acted
    assert generator.calls == []


async def test_another_brands_key_never_reaches_this_shops_orders_and_a_retried_ticket_is_one(
    storefront: tuple[str, FastAPI],
) -> None:
    from services.config import TenantConfig

    url, _ = storefront
    tenants = [TenantConfig(tenant="lumen", persona="p"), TenantConfig(tenant="volt", persona="p")]
    runner = ToolRunner(ToolsConfig(enabled=True, storefront_url=url), tenants)
    lookup = ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"})
    assert (await runner.run(lookup, "shopper-1", "lumen")).action["status"] == "shipped"
    foreign = await runner.run(lookup, "shopper-1", "volt")  # B's key, A's shopper id
    assert not foreign.ok and "403" in foreign.action["message"]
    ticket = ToolCall(name="create_support_ticket", arguments={"subject": "Broken lamp", "description": "It flickers."})
    first = await runner.run(ticket, "shopper-1", "lumen", idempotency_key="k-1")
    again = await runner.run(ticket, "shopper-1", "lumen", idempotency_key="k-1")
    assert first.action["ticket_id"] == again.action["ticket_id"]
