"""The LLM deployment on its own: stream chunking, the engine environment, native tool-call parsing."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.config import LLMConfig, SamplingConfig
from services.llm import LLMServer
from services.schemas import ChatMessage, GenerationChunk, GenerationRequest, ToolCall
from services.vllm_engine import VllmEngine, apply_engine_env
from tests.conftest import RecordingMetrics


class TokenEngine:
    """Yields one character per engine step, like vLLM's DELTA outputs of one token each."""

    max_model_len = 4096

    def __init__(self, tokens: int, textless: int = 0) -> None:
        self.tokens = tokens
        self.textless = textless  # the first tokens carry no text yet (parts of one character)

    def shutdown(self) -> None:
        pass

    def render_prompt(self, messages: list[ChatMessage], tools: Any = None) -> list[int]:
        return [1, 2, 3]

    async def stream(
        self, prompt_ids: list[int], sampling: SamplingConfig, *args: Any, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        for n in range(self.tokens):
            last = n == self.tokens - 1
            yield GenerationChunk(
                text="" if n < self.textless else str(n % 10),
                finish_reason="length" if last else None,
                prompt_tokens=len(prompt_ids) if last else None,
                completion_tokens=self.tokens if last else None,
            )


async def chunks_of(tokens: int, chunk_tokens: int, textless: int = 0) -> list[str]:
    config = LLMConfig(model="m", stream_chunk_tokens=chunk_tokens, stream_chunk_interval_s=3600)
    server = LLMServer.__new__(LLMServer)  # an async constructor: awaited as Serve awaits it
    engine = TokenEngine(tokens, textless)
    await server.__init__(config, engine=engine, metrics=RecordingMetrics())  # type: ignore[arg-type,misc]
    request = GenerationRequest(messages=[ChatMessage(role="user", content="hi")], sampling=SamplingConfig())
    return [chunk.text async for chunk in server.generate(request)]


async def test_the_first_token_is_sent_alone_then_tokens_are_coalesced() -> None:
    assert await chunks_of(10, 4) == ["0", "1234", "5678", "9"]


async def test_the_first_chunk_waits_for_text_when_the_first_tokens_are_parts_of_a_character() -> None:
    assert await chunks_of(10, 4, textless=2) == ["2", "3456", "789"]


async def test_a_one_token_answer_is_one_final_chunk() -> None:
    assert await chunks_of(1, 4) == ["0"]


def test_rays_one_thread_default_does_not_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a replica with num_cpus < 2
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # restored after the test
    apply_engine_env({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    assert "OMP_NUM_THREADS" not in os.environ
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    apply_engine_env({"OMP_NUM_THREADS": "3"})  # an explicit choice in the config wins
    assert os.environ["OMP_NUM_THREADS"] == "3"


# --- tool calls in Qwen2.5's native (Hermes) format, parsed by vLLM's own parser ----------------


@pytest.fixture(scope="module")
def native_parser(tiny_llm_dir: Path) -> VllmEngine:
    """The real engine's ``parse_tool_calls`` with the tiny model's tokenizer, loaded as vLLM loads it.

    The Hermes parser needs only the tokenizer, so no engine is started.
    """
    from vllm.tokenizers import get_tokenizer

    engine = VllmEngine.__new__(VllmEngine)
    engine._tokenizer = get_tokenizer(str(tiny_llm_dir))
    engine._tool_parser = None
    return engine


ORDER_CALL = '<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "LH-1001"}}\n</tool_call>'
TICKET_CALL = (
    '<tool_call>\n{"name": "create_ticket", "arguments": {"subject": "沙发破损", "priority": 2}}\n</tool_call>'
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(ORDER_CALL, [ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"})], id="one"),
        pytest.param(
            f"{ORDER_CALL}\n{TICKET_CALL}",
            [
                ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"}),
                ToolCall(name="create_ticket", arguments={"subject": "沙发破损", "priority": 2}),
            ],
            id="two",
        ),
        pytest.param(
            f"Let me look that up for you.\n{ORDER_CALL}",
            [ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"})],
            id="text-before",
        ),
        pytest.param(
            '<tool_call>\n{"name": "get_order_status", "arguments": {}}\n</tool_call>',
            [ToolCall(name="get_order_status", arguments={})],
            id="no-arguments",
        ),
        # Arguments that are not an object are dropped, the call is kept.
        pytest.param(
            '<tool_call>\n{"name": "get_order_status", "arguments": ["LH-1001"]}\n</tool_call>',
            [ToolCall(name="get_order_status", arguments={})],
            id="arguments-not-an-object",
        ),
        # A complete call whose closing tag the token budget cut off is still read.
        pytest.param(
            '<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "LH-1001"}}\n',
            [ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"})],
            id="unclosed-tag-complete-json",
        ),
    ],
)
def test_native_tool_calls_are_parsed(native_parser: VllmEngine, text: str, expected: list[ToolCall]) -> None:
    assert native_parser.parse_tool_calls(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Your order LH-1001 ships today.", id="plain-text"),
        pytest.param('{"name": "get_order_status", "arguments": {"order_id": "LH-1001"}}', id="bare-json-no-tags"),
        pytest.param(
            '<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "LH-1001"\n</tool_call>',
            id="broken-json",
        ),
        pytest.param('<tool_call>\n{"name": "get_order_status", "argum', id="unclosed-tag-cut-json"),
        pytest.param('<tool_call>\n{"arguments": {"order_id": "LH-1001"}}\n</tool_call>', id="no-name"),
        # vLLM's parser is all or nothing: one broken call drops the valid one next to it.
        pytest.param(f'{ORDER_CALL}\n<tool_call>\n{{"name": "create_ticket", \n</tool_call>', id="one-of-two-broken"),
    ],
)
def test_text_without_a_readable_call_parses_to_no_calls(native_parser: VllmEngine, text: str) -> None:
    assert native_parser.parse_tool_calls(text) == []


class ScriptedEngine(TokenEngine):
    """Streams fixed text one character per step; tool calls parsed by the real engine's parser."""

    def __init__(self, text: str, parser: VllmEngine) -> None:
        super().__init__(len(text))
        self.text = text
        self.parse_tool_calls = parser.parse_tool_calls
        self.kept_special_tokens: list[bool] = []

    async def stream(
        self, prompt_ids: list[int], sampling: SamplingConfig, *args: Any, keep_special_tokens: bool = False
    ) -> AsyncIterator[GenerationChunk]:
        self.kept_special_tokens.append(keep_special_tokens)
        for n, char in enumerate(self.text):
            last = n == len(self.text) - 1
            yield GenerationChunk(text=char, finish_reason="stop" if last else None)


@pytest.mark.parametrize("with_tools", [True, False])
async def test_the_last_chunk_carries_the_calls_parsed_from_the_whole_answer(
    native_parser: VllmEngine, with_tools: bool
) -> None:
    engine = ScriptedEngine(f"Checking.\n{ORDER_CALL}", native_parser)
    server = LLMServer.__new__(LLMServer)
    config = LLMConfig(model="m", stream_chunk_tokens=8)
    await server.__init__(config, engine=engine, metrics=RecordingMetrics())  # type: ignore[arg-type,misc]
    tools = [{"type": "function", "function": {"name": "get_order_status", "parameters": {"type": "object"}}}]
    request = GenerationRequest(
        messages=[ChatMessage(role="user", content="Where is LH-1001?")],
        sampling=SamplingConfig(),
        tools=tools if with_tools else None,
    )
    chunks = [chunk async for chunk in server.generate(request)]
    assert "".join(c.text for c in chunks) == engine.text
    assert all(c.tool_calls is None for c in chunks[:-1])
    # The <tool_call> tags are special tokens: kept only when tools were offered.
    assert engine.kept_special_tokens == [with_tools]
    if with_tools:
        assert chunks[-1].tool_calls == [ToolCall(name="get_order_status", arguments={"order_id": "LH-1001"})]
    else:
        assert chunks[-1].tool_calls is None
