"""Unloading an evicted adapter from vLLM waits for the streams still using it."""

from __future__ import annotations

import asyncio

import pytest

from services.llm import LoadedAdapter

lora_request = pytest.importorskip("vllm.lora.request")


class Engine:
    def __init__(self) -> None:
        self.removed: list[int] = []
        self.done = asyncio.Event()

    async def remove_lora(self, lora_int_id: int) -> None:
        self.removed.append(lora_int_id)
        self.done.set()


async def test_eviction_defers_removal_until_the_last_stream_ends() -> None:
    engine = Engine()
    adapter = LoadedAdapter(
        lora=lora_request.LoRARequest(lora_name="brand", lora_int_id=7, lora_path="/x"),
        engine=engine,  # type: ignore[arg-type]
        loop=asyncio.get_running_loop(),
    )
    adapter.acquire()
    await asyncio.to_thread(adapter.__del__)  # Serve evicts from an executor thread
    await asyncio.sleep(0)  # one loop iteration runs the scheduled check (not a timed wait)
    assert engine.removed == [] and adapter.evicted
    adapter.release()
    await asyncio.wait_for(engine.done.wait(), 5)
    assert engine.removed == [7]
    adapter.__del__()  # GC calls it again: no second removal
    await asyncio.sleep(0)
    assert engine.removed == [7]
