"""GPU use of a replica, sampled through NVML (nvidia-ml-py) into Ray gauges.

Replicas that reserve GPUs (``deployment.num_gpus > 0``: the LLM, and the Embedder in
production) start a :class:`GpuSampler`. It reads utilization and memory of the GPUs Ray
assigned to the replica every ``gpu_sample_interval_s``. Without a GPU, or without the
NVIDIA driver, the gauges are simply absent: one log line says why, nothing fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from services.observability.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment."""

    gpu: str  # NVML index (or UUID when Ray names devices by UUID)
    model: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


class GpuSampler:
    """Samples the given GPUs through an NVML binding (``pynvml`` from nvidia-ml-py by default)."""

    def __init__(self, metrics: Metrics, device_ids: list[str], *, nvml: Any | None = None) -> None:
        """Prepare to sample.

        Args:
            metrics: Where the ``cs_gpu_*`` gauges go.
            device_ids: The replica's GPUs as Ray names them (``ray.get_gpu_ids()``):
                indices, or UUIDs (``GPU-...``).
            nvml: The NVML module; tests pass a stand-in with the same functions.

        """
        self._metrics = metrics
        self._device_ids = device_ids
        self._nvml: Any = nvml
        self._handles: list[tuple[str, str, Any]] = []

    def start(self) -> bool:
        """Initialize NVML and find the devices; False (and one log line) when GPU metrics are off."""
        if not self._device_ids:
            logger.info("no GPU assigned to this replica: GPU metrics are off")
            return False
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            nvml = self._nvml
            nvml.nvmlInit()
            for device in self._device_ids:
                if device.startswith(("GPU-", "MIG-")):
                    handle = nvml.nvmlDeviceGetHandleByUUID(device)
                else:
                    handle = nvml.nvmlDeviceGetHandleByIndex(int(device))
                name = nvml.nvmlDeviceGetName(handle)
                self._handles.append((device, name.decode() if isinstance(name, bytes) else str(name), handle))
        except Exception as err:  # NVMLError (no driver, no device) or an unimportable binding
            logger.warning("GPU metrics are off: NVML is unavailable (%s: %s)", type(err).__name__, err)
            self._handles = []
            return False
        logger.info("sampling GPU use of %s", ", ".join(f"{d} ({m})" for d, m, _ in self._handles))
        return True

    def sample(self) -> list[GpuReading]:
        """Read every device once and set the gauges."""
        nvml = self._nvml
        readings = []
        for device, model, handle in self._handles:
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            reading = GpuReading(device, model, float(utilization.gpu), int(memory.used), int(memory.total))
            tags = {"gpu": device, "model": model}
            self._metrics.set("cs_gpu_utilization_percent", reading.utilization_percent, tags)
            self._metrics.set("cs_gpu_memory_used_bytes", reading.memory_used_bytes, tags)
            self._metrics.set("cs_gpu_memory_total_bytes", reading.memory_total_bytes, tags)
            readings.append(reading)
        return readings

    async def run(self, interval_s: float) -> None:
        """Sample forever (cancel the task to stop); a failing read is logged, not raised."""
        while True:
            try:
                await asyncio.to_thread(self.sample)
            except Exception as err:
                logger.warning("GPU sample failed: %s: %s", type(err).__name__, err)
            await asyncio.sleep(interval_s)


def replica_gpu_ids() -> list[str]:
    """The GPUs Ray assigned to this worker (empty outside Ray or without GPUs)."""
    try:
        import ray

        ids = [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # not a Ray worker
        ids = []
    if not ids and os.environ.get("CUDA_VISIBLE_DEVICES"):
        # A process started with explicit devices (e.g. a test on a GPU box).
        ids = [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d]
    return ids


def start_gpu_sampling(metrics: Metrics, num_gpus: float, interval_s: float) -> asyncio.Task[None] | None:
    """Start sampling in the running event loop if the replica holds GPUs; the task, or None."""
    if num_gpus <= 0:
        logger.info("no GPU reserved for this replica: GPU metrics are off")
        return None
    sampler = GpuSampler(metrics, replica_gpu_ids())
    if not sampler.start():
        return None
    return asyncio.get_running_loop().create_task(sampler.run(interval_s))
