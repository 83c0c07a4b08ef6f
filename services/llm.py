"""LLM deployment: vLLM ``AsyncLLM`` with multi-LoRA, streaming.

The engine sits behind :class:`~services.vllm_engine.TextGenerationEngine`;
:class:`~services.vllm_engine.VllmEngine` is the real one. Requests name their LoRA
adapter through Serve's multiplexed model id, so Serve routes them to replicas that
already hold it; the per-replica loader validates the
adapter folder, loads it into vLLM once and unloads it when Serve evicts it (Serve
itself does not tell vLLM). Generated tokens are coalesced into chunks on the way out,
because per-chunk overhead dominates on fast engines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve.deployment import Application

from services.config import LLMConfig, ObservabilityConfig, SamplingConfig
from services.errors import GenerationError, InvalidAdapterError, InvalidRequestError, NotFoundError, ServiceError
from services.observability.gpu import start_gpu_sampling
from services.observability.logs import configure_replica_logging
from services.observability.metrics import Metrics, RayMetrics, adapter_label, names_for
from services.observability.tracing import tracer
from services.schemas import GenerationChunk, GenerationRequest
from services.vllm_engine import TextGenerationEngine, VllmEngine, apply_engine_env

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    """An adapter resident in this replica's engine.

    Serve's multiplexing evicts by calling ``__del__``; removal from vLLM waits until
    streams still using the adapter have finished.
    """

    lora: LoRARequest
    engine: TextGenerationEngine
    loop: asyncio.AbstractEventLoop
    on_unload: Callable[[str, str], None] | None = None  # (adapter, reason: evicted or checked)
    checked: bool = False  # loaded only to check it, never cached by Serve
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
                self.on_unload(self.lora.lora_name, "checked" if self.checked else "evicted")
            logger.info("unloaded adapter %s", self.lora.lora_name)


@dataclass
class _GenerationWatch:
    """Timings and token count of one generation."""

    started: float
    first_token_s: float | None = None
    total_s: float = 0.0
    completion_tokens: int = 0

    def token(self) -> None:
        """A chunk came from the engine."""
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.started

    def finish(self, last: GenerationChunk, span: Any) -> None:
        """The last chunk came: note totals, on the span too."""
        self.total_s = time.monotonic() - self.started
        self.completion_tokens = last.completion_tokens or 0
        span.set_attribute("completion_tokens", self.completion_tokens)
        span.set_attribute("finish_reason", last.finish_reason or "")
        if self.first_token_s is not None:
            span.set_attribute("time_to_first_token_s", round(self.first_token_s, 4))

    @property
    def tokens_per_second(self) -> float | None:
        """Output tokens per second after the first token (decode speed); None for one-token answers."""
        if self.first_token_s is None or self.completion_tokens < 2 or self.total_s <= self.first_token_s:
            return None
        return (self.completion_tokens - 1) / (self.total_s - self.first_token_s)


class LLMServer:
    """Ray Serve deployment around a :class:`TextGenerationEngine`."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        config: LLMConfig,
        observability: ObservabilityConfig | None = None,
        *,
        engine: TextGenerationEngine | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        observability = observability or ObservabilityConfig()
        configure_replica_logging(observability.log_level, observability.log_format)
        self._config = config
        self._lora_ids = itertools.count(1)
        self._metrics = metrics or RayMetrics(names_for("LLM"))
        if engine is None:
            apply_engine_env(config.engine_env)
            try:
                engine = await asyncio.wait_for(
                    asyncio.to_thread(VllmEngine, config, engine_metrics=observability.vllm_engine_metrics),
                    config.start_timeout_s,
                )
            except TimeoutError as err:
                raise GenerationError(f"vLLM engine did not start within {config.start_timeout_s} s") from err
        self._engine = engine
        self._gpu_sampling = start_gpu_sampling(
            self._metrics, config.deployment.num_gpus, observability.gpu_sample_interval_s
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
            self._metrics.inc("cs_adapter_loads", {"adapter": adapter, "outcome": "error"})
            raise InvalidAdapterError(f"adapter {adapter!r} cannot be loaded: {err}") from err
        self._metrics.inc("cs_adapter_loads", {"adapter": adapter, "outcome": "ok"})
        self._metrics.observe("cs_adapter_load_seconds", time.monotonic() - started, {"adapter": adapter})
        logger.info("loaded adapter %s as id %d", adapter, lora.lora_int_id)
        return LoadedAdapter(
            lora=lora,
            engine=self._engine,
            loop=asyncio.get_running_loop(),
            on_unload=lambda name, reason: self._metrics.inc("cs_adapter_unloads", {"adapter": name, "reason": reason}),
        )

    async def check_adapter(self, adapter: str) -> None:
        """Load an adapter into the engine and unload it again: the last check before registering.

        Raises:
            NotFoundError: no such folder in the store.
            InvalidAdapterError: vLLM refuses the weights.

        """
        loaded = await self._load_adapter(adapter)
        loaded.evicted = loaded.checked = True  # not cached by Serve: unload now (no stream uses it)
        loaded.remove_if_idle()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer to chat messages, using the request's multiplexed adapter if any.

        Yields:
            Chunks of at least ``stream_chunk_tokens`` deltas or ``stream_chunk_interval_s``
            apart; the last one carries the finish reason and token counts.

        """
        adapter_name = serve.get_multiplexed_model_id()
        adapter = await self._get_adapter(adapter_name) if adapter_name else None
        prompt_ids, sampling = self._fit_prompt(request)
        label = adapter_label(adapter_name)
        # Not made current: nothing is called from here, and a context attached in one step
        # of a generator cannot be detached safely in another.
        attributes: dict[str, Any] = {"adapter": label, "prompt_tokens": len(prompt_ids), "tools": bool(request.tools)}
        span = tracer().start_span("llm.generate", attributes=attributes)
        watch = _GenerationWatch(time.monotonic())
        if adapter is not None:
            adapter.acquire()
        try:
            pending: list[str] = []
            everything: list[str] = []
            last_sent, sent_any = time.monotonic(), False
            lora = adapter.lora if adapter else None
            async for chunk in self._engine.stream(
                prompt_ids, sampling, lora, request.json_schema, keep_special_tokens=bool(request.tools)
            ):
                watch.token()
                pending.append(chunk.text)
                everything.append(chunk.text)
                now = time.monotonic()
                if chunk.finish_reason is not None:
                    update: dict[str, Any] = {"text": "".join(pending)}
                    if request.tools:
                        update["tool_calls"] = self._engine.parse_tool_calls("".join(everything)) or None
                    watch.finish(chunk, span)
                    self._record(watch, label, request.tenant, len(prompt_ids))
                    yield chunk.model_copy(update=update)
                    return
                # The first text goes out at once (time to first token); later text is coalesced.
                # A token that is part of a character (most Chinese ones) has no text yet: it waits.
                if any(pending) and (
                    not sent_any
                    or len(pending) >= self._config.stream_chunk_tokens
                    or now - last_sent >= self._config.stream_chunk_interval_s
                ):
                    yield GenerationChunk(text="".join(pending))
                    pending, last_sent, sent_any = [], now, True
        except ServiceError as err:
            span.record_exception(err)
            raise
        except Exception as err:
            span.record_exception(err)
            raise GenerationError(f"generation failed: {type(err).__name__}: {err}") from err
        finally:
            span.end()
            if adapter is not None:
                adapter.release()

    def _fit_prompt(self, request: GenerationRequest) -> tuple[list[int], SamplingConfig]:
        """The prompt's tokens, and the sampling with its token budget capped to the context left.

        Raises:
            InvalidRequestError: the prompt alone fills the model's context.

        """
        prompt_ids = self._engine.render_prompt(request.messages, request.tools)
        room = self._engine.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self._engine.max_model_len}"
            )
        return prompt_ids, request.sampling.model_copy(update={"max_tokens": min(request.sampling.max_tokens, room)})

    def _record(self, watch: _GenerationWatch, adapter: str, tenant: str | None, prompt_tokens: int) -> None:
        """The metrics of one finished generation."""
        tags = {"adapter": adapter}
        if watch.first_token_s is not None:
            self._metrics.observe("cs_llm_time_to_first_token_seconds", watch.first_token_s, tags)
        self._metrics.observe("cs_llm_generation_seconds", watch.total_s, tags)
        if watch.tokens_per_second is not None:
            self._metrics.observe("cs_llm_tokens_per_second", watch.tokens_per_second, tags)
        usage = {"tenant": tenant or "none", "adapter": adapter}
        self._metrics.inc("cs_llm_prompt_tokens", usage, prompt_tokens)
        self._metrics.inc("cs_llm_completion_tokens", usage, watch.completion_tokens)

    async def check_health(self) -> None:
        """Fail when the engine is dead."""
        await self._engine.check_health()

    async def unfinished_requests(self) -> int:
        """Requests this replica's engine is still generating: 0 once every stopped request was aborted."""
        return self._engine.unfinished_requests()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def build_llm(config: LLMConfig, observability: ObservabilityConfig | None = None) -> Application:
    """Bind the LLM deployment with its Serve options from config."""
    deployment = serve.deployment(name="LLM", **config.deployment.to_serve_options(uses_pandas=False))(LLMServer)
    return deployment.bind(config, observability or ObservabilityConfig())
