"""LLM deployment: vLLM ``AsyncLLM`` with multi-LoRA, streaming.

The engine sits behind :class:`TextGenerationEngine`; :class:`VllmEngine` is the real
one. Requests name their LoRA adapter through Serve's multiplexed model id, so Serve
routes them to replicas that already hold it; the per-replica loader validates the
adapter folder, loads it into vLLM once and unloads it when Serve evicts it (Serve
itself does not tell vLLM). Generated tokens are coalesced into chunks on the way out,
because per-chunk overhead dominates on fast engines.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ray import serve
from ray.serve.deployment import Application
from ray.serve.metrics import Counter, Histogram

from services.config import LLMConfig, SamplingConfig
from services.errors import GenerationError, InvalidAdapterError, InvalidRequestError, NotFoundError, ServiceError
from services.schemas import ChatMessage, GenerationChunk, GenerationRequest, ToolCall

if TYPE_CHECKING:
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

    def shutdown(self) -> None:
        """Stop the engine processes."""
        ...


class VllmEngine:
    """The real engine: vLLM ``AsyncLLM``."""

    def __init__(self, config: LLMConfig) -> None:
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

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
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
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
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = StructuredOutputsParams(json=json_schema) if json_schema is not None else None
        params = SamplingParams(
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

    def shutdown(self) -> None:
        """Stop EngineCore; without it shared-memory segments can outlive the replica."""
        self._engine.shutdown()


@dataclass
class LoadedAdapter:
    """An adapter resident in this replica's engine.

    Serve's multiplexing evicts by calling ``__del__``; removal from vLLM waits until
    streams still using the adapter have finished.
    """

    lora: LoRARequest
    engine: TextGenerationEngine
    loop: asyncio.AbstractEventLoop
    on_unload: Callable[[str], None] | None = None
    active_streams: int = 0
    evicted: bool = False
    _removed: bool = field(default=False, repr=False)

    def acquire(self) -> None:
        """Mark a stream as using the adapter."""
        self.active_streams += 1

    def release(self) -> None:
        """Mark a stream as done; unload if it was the last one after eviction."""
        self.active_streams -= 1
        self.remove_if_idle()

    def __del__(self) -> None:
        # Called by Serve from an executor thread on eviction, and again by GC: idempotent.
        self.evicted = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.remove_if_idle)

    def remove_if_idle(self) -> None:
        """Unload from the engine once evicted and no stream uses it."""
        if self.evicted and self.active_streams == 0 and not self._removed:
            self._removed = True
            self.loop.create_task(self.engine.remove_lora(self.lora.lora_int_id))
            if self.on_unload is not None:
                self.on_unload(self.lora.lora_name)
            logger.info("unloaded adapter %s", self.lora.lora_name)


class LLMServer:
    """Ray Serve deployment around a :class:`TextGenerationEngine`."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, config: LLMConfig, *, engine: TextGenerationEngine | None = None
    ) -> None:
        self._config = config
        self._lora_ids = itertools.count(1)
        if engine is None:
            # vLLM reads VLLM_* variables when the engine starts; config sets them per deployment.
            os.environ.update(config.engine_env)
            try:
                engine = await asyncio.wait_for(asyncio.to_thread(VllmEngine, config), config.start_timeout_s)
            except TimeoutError as err:
                raise GenerationError(f"vLLM engine did not start within {config.start_timeout_s} s") from err
        self._engine = engine
        self._adapter_loads = Counter(
            "cs_adapter_loads",
            description="LoRA adapters loaded into the engine.",
            tag_keys=("adapter", "outcome"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        )
        self._adapter_unloads = Counter(
            "cs_adapter_unloads", description="LoRA adapters unloaded (evicted or checked).", tag_keys=("adapter",)
        )
        self._adapter_load_seconds = Histogram(
            "cs_adapter_load_seconds",
            description="Time to load a LoRA adapter into the engine.",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=("adapter",),
        )

        # The LRU bound comes from config, so the multiplexed loader is wrapped per instance.
        # Serve caches its state on the wrapped callable, which must be a plain function.
        async def load_adapter(name: str) -> LoadedAdapter:
            return await self._load_adapter(name)

        self._get_adapter = serve.multiplexed(max_num_models_per_replica=config.max_loras)(load_adapter)

    def _adapter_path(self, adapter: str) -> Path:
        """Folder of ``name@version`` (``<store>/name/version``) or of a plain ``name`` (``<store>/name``)."""
        if not self._config.adapters_dir:
            raise NotFoundError(f"adapter {adapter!r} requested but no adapters_dir is configured")
        root = Path(self._config.adapters_dir).resolve()
        path = (root / Path(*adapter.split("@", 1))).resolve()
        if not path.is_relative_to(root) or path == root or not (path / "adapter_config.json").is_file():
            raise NotFoundError(f"adapter {adapter!r} not found in the adapter store")
        return path

    async def _load_adapter(self, adapter: str) -> LoadedAdapter:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(
            lora_name=adapter, lora_int_id=next(self._lora_ids), lora_path=str(self._adapter_path(adapter))
        )
        started = time.monotonic()
        try:
            await self._engine.add_lora(lora)
        except Exception as err:
            self._adapter_loads.inc(tags={"adapter": adapter, "outcome": "error"})
            raise InvalidAdapterError(f"adapter {adapter!r} cannot be loaded: {err}") from err
        self._adapter_loads.inc(tags={"adapter": adapter, "outcome": "ok"})
        self._adapter_load_seconds.observe(time.monotonic() - started, tags={"adapter": adapter})
        logger.info("loaded adapter %s as id %d", adapter, lora.lora_int_id)
        return LoadedAdapter(
            lora=lora,
            engine=self._engine,
            loop=asyncio.get_running_loop(),
            on_unload=lambda name: self._adapter_unloads.inc(tags={"adapter": name}),
        )

    async def check_adapter(self, adapter: str) -> None:
        """Load an adapter into the engine and unload it again: the last check before registering.

        Raises:
            NotFoundError: no such folder in the store.
            InvalidAdapterError: vLLM refuses the weights.

        """
        loaded = await self._load_adapter(adapter)
        loaded.evicted = True  # not cached by Serve: unload now (no stream uses it)
        loaded.remove_if_idle()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer to chat messages, using the request's multiplexed adapter if any.

        Yields:
            Chunks of at least ``stream_chunk_tokens`` deltas or ``stream_chunk_interval_s``
            apart; the last one carries the finish reason and token counts.

        """
        adapter_name = serve.get_multiplexed_model_id()
        adapter = await self._get_adapter(adapter_name) if adapter_name else None
        prompt_ids = self._engine.render_prompt(request.messages, request.tools)
        room = self._engine.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self._engine.max_model_len}"
            )
        sampling = request.sampling.model_copy(update={"max_tokens": min(request.sampling.max_tokens, room)})
        if adapter is not None:
            adapter.acquire()
        try:
            pending: list[str] = []
            everything: list[str] = []
            last_sent = time.monotonic()
            lora = adapter.lora if adapter else None
            async for chunk in self._engine.stream(
                prompt_ids, sampling, lora, request.json_schema, keep_special_tokens=bool(request.tools)
            ):
                pending.append(chunk.text)
                everything.append(chunk.text)
                now = time.monotonic()
                if chunk.finish_reason is not None:
                    update: dict[str, Any] = {"text": "".join(pending)}
                    if request.tools:
                        update["tool_calls"] = self._engine.parse_tool_calls("".join(everything)) or None
                    yield chunk.model_copy(update=update)
                    return
                if len(pending) >= self._config.stream_chunk_tokens or now - last_sent >= (
                    self._config.stream_chunk_interval_s
                ):
                    yield GenerationChunk(text="".join(pending))
                    pending, last_sent = [], now
        except ServiceError:
            raise
        except Exception as err:
            raise GenerationError(f"generation failed: {type(err).__name__}: {err}") from err
        finally:
            if adapter is not None:
                adapter.release()

    async def check_health(self) -> None:
        """Fail when the engine is dead."""
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def build_llm(config: LLMConfig) -> Application:
    """Bind the LLM deployment with its Serve options from config."""
    return serve.deployment(name="LLM", **config.deployment.to_serve_options())(LLMServer).bind(config)
