"""The LLM deployment on its own: stream chunking and the engine environment."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.config import LLMConfig, SamplingConfig
from services.llm import LLMServer
from services.schemas import ChatMessage, GenerationChunk, GenerationRequest
from services.vllm_engine import apply_engine_env
from tests.conftest import RecordingMetrics


class TokenEngine:
    """Yields one character per engine step, like vLLM's DELTA outputs of one token each."""

    max_model_len = 4096

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

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
                text=str(n % 10),
                finish_reason="length" if last else None,
                prompt_tokens=len(prompt_ids) if last else None,
                completion_tokens=self.tokens if last else None,
            )


async def chunks_of(tokens: int, chunk_tokens: int) -> list[str]:
    config = LLMConfig(model="m", stream_chunk_tokens=chunk_tokens, stream_chunk_interval_s=3600)
    server = LLMServer.__new__(LLMServer)  # an async constructor: awaited as Serve awaits it
    await server.__init__(config, engine=TokenEngine(tokens), metrics=RecordingMetrics())  # type: ignore[arg-type,misc]
    request = GenerationRequest(messages=[ChatMessage(role="user", content="hi")], sampling=SamplingConfig())
    return [chunk.text async for chunk in server.generate(request)]


async def test_the_first_token_is_sent_alone_then_tokens_are_coalesced() -> None:
    assert await chunks_of(10, 4) == ["0", "1234", "5678", "9"]


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
