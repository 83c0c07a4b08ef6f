"""Time and load limits: the engine's generation stops however a stream ends early; a full queue is a fast 503."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.chat.clients import LLMClient, call_dependency
from services.config import SamplingConfig
from services.errors import DeadlineExceededError, DependencyUnavailableError, OverloadedError
from services.schemas import ChatMessage, GenerationChunk

MESSAGES = [ChatMessage(role="user", content="hi")]


class Generation:
    """Stands in for Serve's streaming response: chunks every ``gap_s``; records its cancellation."""

    def __init__(self, gap_s: float, chunks: int = 100) -> None:
        self.gap_s, self.chunks, self.cancelled = gap_s, chunks, False

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[GenerationChunk]:
        for n in range(self.chunks):
            await asyncio.sleep(self.gap_s)
            yield GenerationChunk(text=f"t{n} ", finish_reason="stop" if n == self.chunks - 1 else None)

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """Stands in for the LLM deployment's handle."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.generate = self

    def options(self, **_: Any) -> Handle:
        return self

    def remote(self, request: Any) -> Generation:
        return self.generation


def client(generation: Generation, timeout_s: float = 5.0) -> LLMClient:
    return LLMClient(Handle(generation), timeout_s)  # type: ignore[arg-type]


async def test_a_stream_read_to_its_end_is_not_cancelled() -> None:
    generation = Generation(gap_s=0, chunks=3)
    chunks = [c async for c in client(generation).stream(MESSAGES, SamplingConfig(), None)]
    assert len(chunks) == 3 and not generation.cancelled


async def test_a_stream_closed_early_cancels_the_generation() -> None:
    generation = Generation(gap_s=0)
    stream = client(generation).stream(MESSAGES, SamplingConfig(), None)
    await anext(stream)
    await stream.aclose()  # a withheld answer, a client gone
    assert generation.cancelled


async def test_past_the_deadline_the_stream_ends_with_a_504_and_the_generation_stops() -> None:
    generation = Generation(gap_s=0.05)
    stream = client(generation).stream(MESSAGES, SamplingConfig(), None, deadline=time.monotonic() + 0.3)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as raised:
        async for _ in stream:
            pass
    assert raised.value.status_code == 504 and generation.cancelled
    assert time.monotonic() - started < 1.0  # ended at the deadline, not after 100 chunks


async def test_a_chunk_later_than_the_timeout_is_a_503_and_the_generation_stops() -> None:
    generation = Generation(gap_s=1.0)
    with pytest.raises(DependencyUnavailableError, match="did not answer within"):
        async for _ in client(generation, timeout_s=0.1).stream(MESSAGES, SamplingConfig(), None):
            pass
    assert generation.cancelled


async def test_a_full_queue_is_an_overloaded_503_with_a_retry_hint() -> None:
    from ray.serve.exceptions import BackPressureError

    async def refused() -> None:
        raise BackPressureError(num_queued_requests=10, max_queued_requests=10)

    with pytest.raises(OverloadedError) as raised:
        await call_dependency("LLM", refused, 5)
    assert raised.value.status_code == 503 and raised.value.retry_after_s == 1


async def test_a_dependencys_own_error_text_stays_out_of_the_message() -> None:
    async def crashed() -> None:
        raise RuntimeError("actor 10.0.3.7:6379 pid=4242 died")

    with pytest.raises(DependencyUnavailableError) as raised:
        await call_dependency("LLM", crashed, 5)
    assert raised.value.message == "LLM failed (RuntimeError)"
