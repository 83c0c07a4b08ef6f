"""The vLLM engine behind a narrow interface: engine arguments, sampling, prompts, tool-call parsing.

:class:`TextGenerationEngine` is what the LLM deployment needs of an engine;
:class:`VllmEngine` is the real one (``AsyncLLM``). vLLM is imported only here and only
when an engine is made.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from services.config import LLMConfig, SamplingConfig
from services.observability.metrics import GAUGES
from services.schemas import ChatMessage, GenerationChunk, ToolCall

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class TextGenerationEngine(Protocol):
    """What the platform needs from an LLM engine."""

    max_model_len: int

    def render_prompt(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Apply the model's chat template (with tool specs, if any) and tokenize."""
        ...

    def stream(
        self,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        lora: LoRARequest | None,
        json_schema: dict[str, Any] | None = None,
        keep_special_tokens: bool = False,
    ) -> AsyncIterator[GenerationChunk]:
        """Generate, yielding text deltas; the last chunk has ``finish_reason``."""
        ...

    def parse_tool_calls(self, text: str) -> list[ToolCall]:
        """Tool calls in a finished output of the model's native tool format."""
        ...

    async def add_lora(self, lora: LoRARequest) -> None:
        """Load an adapter into the engine."""
        ...

    async def remove_lora(self, lora_int_id: int) -> None:
        """Unload an adapter from the engine."""
        ...

    async def check_health(self) -> None:
        """Raise when the engine is dead."""
        ...

    def unfinished_requests(self) -> int:
        """Requests the engine is still working on (running or waiting)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine processes."""
        ...


def _ray_stat_logger_keeping_gauges() -> type:
    """The Ray stat logger of vLLM (the one Ray Serve LLM uses), with its gauges kept visible.

    vLLM sets its gauges (KV-cache use, running and waiting requests) only while the engine
    steps; Ray drops a gauge once scraped, so an idle engine's gauges would vanish instead of
    reading 0. Every value set goes to the process's :data:`GAUGES` keeper as well.
    """
    from vllm.v1.metrics.ray_wrappers import RayGaugeWrapper, RayPrometheusStatLogger

    class KeptRayGauge(RayGaugeWrapper):
        def set(self, value: int | float) -> None:
            super().set(value)
            GAUGES.remember(self.metric, float(value), self._tags)

    class KeptGaugesRayStatLogger(RayPrometheusStatLogger):
        _gauge_cls = KeptRayGauge

    return KeptGaugesRayStatLogger


def engine_args(config: LLMConfig) -> AsyncEngineArgs:
    """The vLLM engine arguments for an LLM config (also what the benchmarks give the bare engine)."""
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(config))


def engine_kwargs(config: LLMConfig) -> dict[str, Any]:
    """:func:`engine_args` as keyword arguments (what Ray Serve LLM's ``engine_kwargs`` takes in the benchmark)."""
    from vllm.config import StructuredOutputsConfig

    args: dict[str, Any] = {
        "model": config.model,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "enable_lora": config.enable_lora,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "tensor_parallel_size": config.tensor_parallel_size,
        "enforce_eager": config.enforce_eager,
    }
    if config.enable_lora:
        args |= {"max_lora_rank": config.max_lora_rank, "max_loras": config.max_loras}
    if config.kv_cache_memory_bytes is not None:
        args["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
    # Compact JSON under structured output: with whitespace allowed, small models spend
    # their token budget on blanks between fields. vLLM reads this per engine, not per request.
    args["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
    args |= config.engine_kwargs
    return args


def sampling_params(
    sampling: SamplingConfig, json_schema: dict[str, Any] | None = None, keep_special_tokens: bool = False
) -> SamplingParams:
    """The vLLM sampling parameters of a streamed generation (deltas), under a JSON schema when given."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = StructuredOutputsParams(json=json_schema) if json_schema is not None else None
    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        stop=sampling.stop or None,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured,
        # Qwen's <tool_call> tags are added tokens: keep them so the tool parser sees them.
        skip_special_tokens=not keep_special_tokens,
    )


def apply_engine_env(engine_env: dict[str, str]) -> None:
    """Set the engine's environment in this process, before the engine (and its children) start.

    vLLM reads ``VLLM_*`` variables when the engine starts; config sets them per deployment.
    Ray sets ``OMP_NUM_THREADS`` in every worker to the whole CPUs the actor reserved (1 for
    the fractional ``num_cpus`` of a replica), which pins vLLM's CPU engine to one thread:
    measured on the dev box, the LLM replica's engine ran at 100% of one core while the bare
    engine used both. vLLM sizes its threads itself when the variable is unset (on CPU, every
    core but ``VLLM_CPU_NUM_OF_RESERVED_CPU``; on GPU, a small number per worker:
    ``vllm/v1/engine/utils.py``, ``multiproc_executor.py``), so Ray's value is dropped unless
    the config's ``engine_env`` sets one.
    """
    if "OMP_NUM_THREADS" not in engine_env:
        os.environ.pop("OMP_NUM_THREADS", None)
    os.environ.update(engine_env)


class VllmEngine:
    """The real engine: vLLM ``AsyncLLM``."""

    def __init__(self, config: LLMConfig, *, engine_metrics: bool = True) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        stat_loggers: list[Any] = []
        if engine_metrics:
            # vLLM's engine metrics (KV-cache use, queue length, ...) as Ray metrics, so they
            # are scraped from the same endpoint as ours (the logger Ray Serve LLM uses).
            stat_loggers.append(_ray_stat_logger_keeping_gauges())
        self._engine = AsyncLLM.from_engine_args(engine_args(config), stat_loggers=stat_loggers or None)
        self._tokenizer = self._engine.get_tokenizer()
        self._tool_parser: Any = None
        self.max_model_len = config.max_model_len

    def render_prompt(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Apply the tokenizer's chat template (ChatML for Qwen; tools in its Hermes format) and tokenize."""
        rendered: Any = self._tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tools=tools, tokenize=True, add_generation_prompt=True
        )
        # transformers 5 returns a BatchEncoding (a mapping); older versions a list of ids.
        ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        return [int(token) for token in ids]

    async def stream(
        self,
        prompt_ids: list[int],
        sampling: SamplingConfig,
        lora: LoRARequest | None,
        json_schema: dict[str, Any] | None = None,
        keep_special_tokens: bool = False,
    ) -> AsyncIterator[GenerationChunk]:
        """Stream text deltas from vLLM, under a JSON schema when given."""
        params = sampling_params(sampling, json_schema, keep_special_tokens)
        request_id = uuid.uuid4().hex
        completion_tokens = 0
        async for output in self._engine.generate(
            {"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora
        ):
            piece = output.outputs[0]
            completion_tokens += len(piece.token_ids)
            yield GenerationChunk(
                text=piece.text,
                finish_reason=piece.finish_reason if output.finished else None,
                prompt_tokens=len(prompt_ids) if output.finished else None,
                completion_tokens=completion_tokens if output.finished else None,
            )

    def parse_tool_calls(self, text: str) -> list[ToolCall]:
        """Tool calls in Qwen2.5's native (Hermes) format, parsed by vLLM's own Hermes tool parser."""
        from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

        if self._tool_parser is None:
            self._tool_parser = Hermes2ProToolParser(self._tokenizer)
        # The request argument only matters for streaming extraction.
        info = self._tool_parser.extract_tool_calls(text, None)
        calls = []
        for call in info.tool_calls if info.tools_called else []:
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except ValueError:
                arguments = {}
            calls.append(ToolCall(name=call.function.name, arguments=arguments if isinstance(arguments, dict) else {}))
        return calls

    async def add_lora(self, lora: LoRARequest) -> None:
        """Load an adapter; vLLM raises when the weights do not fit the engine."""
        await self._engine.add_lora(lora)

    async def remove_lora(self, lora_int_id: int) -> None:
        """Unload an adapter."""
        await self._engine.remove_lora(lora_int_id)

    async def check_health(self) -> None:
        """Raise when the engine core is dead."""
        await self._engine.check_health()

    def unfinished_requests(self) -> int:
        """Requests the engine is still working on (running or waiting)."""
        return int(self._engine.get_num_unfinished_requests())

    def shutdown(self) -> None:
        """Stop EngineCore; without it shared-memory segments can outlive the replica."""
        self._engine.shutdown()
