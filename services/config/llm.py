"""Config of the LLM deployment and of one generation's sampling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.config.base import DeploymentOptions, StrictModel


class SamplingConfig(StrictModel):
    """Sampling parameters of one generation."""

    temperature: float = Field(0.2, ge=0, le=2, description="0 is greedy and deterministic.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(512, ge=1, le=32768, description="Most new tokens.")
    repetition_penalty: float = Field(1.05, gt=0, le=2, description="1 disables it.")
    seed: int | None = Field(None, description="Fixed seed for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")


class LLMConfig(StrictModel):
    """The vLLM engine."""

    model: str = Field(description="Model folder or hub id, e.g. Qwen/Qwen2.5-7B-Instruct.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights dtype.")
    max_model_len: int = Field(8192, ge=64, description="Context length (prompt + answer).")
    enable_lora: bool = Field(True, description="Serve LoRA adapters on the base model.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank the engine accepts.")
    max_loras: int = Field(4, ge=1, description="Adapters resident in one batch (engine slots).")
    adapters_dir: str | None = Field(None, description="Folder of PEFT adapters, one sub-folder per adapter name.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache size; required on CPU, where vLLM otherwise asks for most of the RAM."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine.")
    enforce_eager: bool = Field(False, description="Skip graph capture/compilation: faster start, slower steps.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra AsyncEngineArgs, verbatim.")
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="VLLM_* variables set in the replica before the engine starts."
    )
    start_timeout_s: float = Field(900, gt=0, description="Bound on engine start-up.")
    stream_chunk_tokens: int = Field(
        32, ge=1, description="Tokens coalesced into one streamed chunk at most; per-chunk cost dominates fast engines."
    )
    stream_chunk_interval_s: float = Field(
        0.2,
        ge=0,
        description="A chunk is sent at least this often (the first token at once). Under load each stream's tokens "
        "come slower, so a short interval means more, smaller chunks just when CPU is scarce (benchmarks/README.md).",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Serve options.")

    @model_validator(mode="after")
    def _lora_settings(self) -> LLMConfig:
        if self.adapters_dir is not None and not self.enable_lora:
            raise ValueError("adapters_dir is set but enable_lora is false")
        return self
