"""Config of logs and GPU sampling in every deployment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.config.base import StrictModel


class ObservabilityConfig(StrictModel):
    """Logs and GPU sampling of every deployment (metrics are always on; tracing is set by environment)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least level of the platform's logs; DEBUG adds shoppers' message text and user ids."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one object per line with request_id and trace_id; text: for reading in a console."
    )
    gpu_sample_interval_s: float = Field(
        5.0, gt=0, description="How often replicas holding GPUs read GPU utilization and memory through NVML."
    )
    vllm_engine_metrics: bool = Field(
        True, description="Export vLLM's own engine metrics (KV-cache use, queue length) next to ours."
    )
