"""The orchestrator reuses a tenant's knowledge generation (the answer cache's key), fresh after its own ingest."""

from __future__ import annotations

from typing import Any

from services.chat.clients import RetrieverClient
from services.knowledge.ingest import SourceBatch


class Call:
    """An awaitable deployment call."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Any:
        async def done() -> Any:
            return self.value

        return done().__await__()


class RetrieverHandle:
    """Stands in for the Retriever deployment: counts state reads; an ingest commits the next generation."""

    def __init__(self) -> None:
        self.generation = 7
        self.state_reads = 0
        self.knowledge_state = self.ingest = self

    def remote(self, tenant: str, *ingest_args: Any) -> Call:
        if ingest_args:  # ingest(tenant, source, batch, chunking, max_delete_fraction)
            self.generation += 1
            return Call({"generation": self.generation})
        self.state_reads += 1
        return Call({"generation": self.generation, "sources": {}})


def client(handle: RetrieverHandle, generation_cache_s: float) -> RetrieverClient:
    return RetrieverClient(handle, 5, 5, generation_cache_s=generation_cache_s)  # type: ignore[arg-type]


async def test_the_generation_is_asked_once_within_the_cache_time_per_tenant() -> None:
    handle = RetrieverHandle()
    knowledge = client(handle, generation_cache_s=60)
    assert [await knowledge.generation("lumen") for _ in range(5)] == [7] * 5
    assert handle.state_reads == 1
    await knowledge.generation("voltmart")
    assert handle.state_reads == 2


async def test_with_no_cache_time_every_request_asks() -> None:
    handle = RetrieverHandle()
    knowledge = client(handle, generation_cache_s=0)
    for _ in range(3):
        await knowledge.generation("lumen")
    assert handle.state_reads == 3


async def test_an_ingest_through_this_replica_is_seen_at_once() -> None:
    handle = RetrieverHandle()
    knowledge = client(handle, generation_cache_s=60)
    assert await knowledge.generation("lumen") == 7
    await knowledge.ingest("lumen", "faq", SourceBatch(complete=False), None)
    assert await knowledge.generation("lumen") == 8
