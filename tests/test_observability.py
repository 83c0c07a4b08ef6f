"""Observability at unit level: the metric catalog, the GPU sampler, JSON logs, spans of the pipeline."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Literal

import httpx
import pytest

from services.chat.contracts import ChatRequest
from services.chat.pipeline import ChatPipeline
from services.config import OrchestratorConfig
from services.observability.gpu import GpuSampler
from services.observability.metrics import CATALOG, REQUEST_OUTCOMES, GaugeKeeper, Metrics
from services.tools import ToolRunner
from tests.conftest import REPO_ROOT, RecordingMetrics, orchestrator_args
from tests.test_pipeline import Generator, Retriever
from tests.test_tools import ToolCallingGenerator, tools_config

# --- the catalog and its manual ------------------------------------------------------------


def documented_metric_rows() -> dict[str, set[str]]:
    """Metric name -> labels, from the observability manual's table (rows like | `ray_x` | a, b | ...)."""
    text = (REPO_ROOT / "docs" / "observability.md").read_text()
    section = text[text.index("## Metrics") : text.index("## Tracing")]
    rows = {}
    for match in re.finditer(r"^\| `(ray_[a-z0-9_]+)` \| ([^|]*) \|", section, re.MULTILINE):
        rows[match.group(1)] = {label.strip() for label in match.group(2).split(",") if label.strip()}
    return rows


def test_the_observability_manual_documents_every_metric_with_its_labels() -> None:
    documented = documented_metric_rows()
    assert documented == {spec.exported: set(spec.labels) for spec in CATALOG}


def test_recording_checks_names_and_labels() -> None:
    metrics = Metrics()
    metrics.inc("cs_requests", {"tenant": "lumen", "outcome": "answered"})
    with pytest.raises(ValueError, match="not in the catalog"):
        metrics.inc("cs_typo", {})
    with pytest.raises(ValueError, match="takes labels"):
        metrics.observe("cs_stage_seconds", 0.1, {"stage": "embed", "tenant": "lumen"})
    with pytest.raises(ValueError, match="not in the catalog"):
        metrics.set("vllm_kv_cache_usage_perc", 0.5, {"model_name": "m", "engine": "0"})  # vLLM's own


def test_the_gauge_keeper_sets_every_last_value_again() -> None:
    class Gauge:
        def __init__(self) -> None:
            self.calls: list[tuple[float, dict[str, str]]] = []

        def set(self, value: float, tags: dict[str, str]) -> None:
            self.calls.append((value, tags))

    keeper, gauge = GaugeKeeper(), Gauge()
    keeper.remember(gauge, 1.0, {"gpu": "0"})
    keeper.remember(gauge, 2.0, {"gpu": "0"})  # replaces the first
    keeper.remember(gauge, 5.0, {"gpu": "1"})
    assert keeper.refresh() == 2
    assert sorted(gauge.calls, key=lambda c: c[1]["gpu"]) == [(2.0, {"gpu": "0"}), (5.0, {"gpu": "1"})]


def test_the_gauge_keeper_keeps_only_the_latest_label_sets_of_a_gauge() -> None:
    class Gauge:
        def __init__(self) -> None:
            self.calls: list[dict[str, str]] = []

        def set(self, value: float, tags: dict[str, str]) -> None:
            self.calls.append(tags)

    # vLLM's lora_requests_info names the adapters running now: a new label set at every change.
    keeper, lora_info, kv = GaugeKeeper(max_series=4), Gauge(), Gauge()
    for n in range(1000):
        keeper.remember(lora_info, 1.0, {"running_lora_adapters": f"brand-{n}"})
    keeper.remember(kv, 0.5, {"engine": "0"})
    assert keeper.refresh() == 5
    assert [t["running_lora_adapters"] for t in lora_info.calls] == [f"brand-{n}" for n in range(996, 1000)]
    assert kv.calls == [{"engine": "0"}]  # another gauge's series are not evicted by it


# --- GPU sampler -------------------------------------------------------------------------------


class FakeNvml:
    """The part of nvidia-ml-py's ``pynvml`` interface the sampler uses, for two GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.utilization = {0: 87, 1: 3}

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index not in self.utilization:
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return {"GPU-aaaa": 0, "GPU-bbbb": 1}[uuid]

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self.utilization[handle], memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30, free=0)


def test_gpu_sampler_sets_utilization_and_memory_per_gpu() -> None:
    metrics = RecordingMetrics()
    nvml = FakeNvml()
    sampler = GpuSampler(metrics, ["0", "1"], nvml=nvml)
    assert sampler.start()
    readings = sampler.sample()
    assert [(r.gpu, r.utilization_percent, r.memory_used_bytes) for r in readings] == [
        ("0", 87.0, 2**30),
        ("1", 3.0, 2 * 2**30),
    ]
    tags = {"gpu": "1", "model": "NVIDIA H100 80GB HBM3"}
    assert ("cs_gpu_memory_total_bytes", tags, 80 * 2**30) in metrics.records
    nvml.utilization[1] = 55  # the next sample reads again
    sampler.sample()
    assert ("cs_gpu_utilization_percent", tags, 55.0) in metrics.records


def test_gpu_sampler_finds_devices_by_uuid() -> None:
    sampler = GpuSampler(RecordingMetrics(), ["GPU-bbbb"], nvml=FakeNvml())
    assert sampler.start()
    assert [r.memory_used_bytes for r in sampler.sample()] == [2 * 2**30]


@pytest.mark.parametrize(
    ("devices", "nvml", "line"),
    [
        ([], FakeNvml(), "no GPU assigned"),
        (["0"], FakeNvml(fail_init=True), "NVML is unavailable (NVMLError: Driver Not Loaded)"),
        (["7"], FakeNvml(), "NVML is unavailable (NVMLError: Invalid Argument)"),
        # The real nvidia-ml-py on a machine without a GPU driver.
        pytest.param(["0"], None, "NVML is unavailable", marks=pytest.mark.no_gpu, id="real-nvml"),
    ],
)
def test_without_a_gpu_the_metrics_are_absent_and_one_line_says_why(
    devices: list[str], nvml: Any, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = RecordingMetrics()
    sampler = GpuSampler(metrics, devices, nvml=nvml)
    with caplog.at_level(logging.INFO, logger="services.observability.gpu"):
        assert sampler.start() is False
    assert sampler.sample() == [] and metrics.records == []
    assert len(caplog.records) == 1 and line in caplog.records[0].getMessage()


@pytest.mark.gpu
def test_the_real_nvml_reads_a_gpu() -> None:
    metrics = RecordingMetrics()
    sampler = GpuSampler(metrics, ["0"])
    assert sampler.start()
    [reading] = sampler.sample()
    assert reading.memory_total_bytes > reading.memory_used_bytes > 0 and 0 <= reading.utilization_percent <= 100
    assert {name for name, _, _ in metrics.records} == {
        "cs_gpu_utilization_percent",
        "cs_gpu_memory_used_bytes",
        "cs_gpu_memory_total_bytes",
    }


# --- JSON logs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def span_exporter() -> Iterator[Any]:
    """An SDK tracer provider with an in-memory exporter (the process's global provider, set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter


@contextmanager
def platform_logs(level: str, log_format: Literal["json", "text"], **context: str) -> Iterator[io.StringIO]:
    """The platform's loggers writing to a string, restored afterwards (other tests rely on propagation)."""
    from services.observability.logs import PLATFORM_LOGGERS, configure_logging

    loggers = [logging.getLogger(name) for name in PLATFORM_LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    stream = io.StringIO()
    handler = configure_logging(level, log_format, stream=stream, **context)
    try:
        yield stream
    finally:
        for logger, (saved_level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(saved_level)
            logger.propagate = propagate


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    with platform_logs("INFO", "json", component="Orchestrator", replica="r1") as stream:
        yield stream


async def test_log_lines_are_json_with_request_and_trace_ids_and_no_shopper_text(
    span_exporter: Any, json_log: io.StringIO
) -> None:
    from ray.serve.context import _RequestContext, _serve_request_context

    from services.observability.tracing import tracer

    chat = ChatPipeline(OrchestratorConfig.model_validate(orchestrator_args()), Retriever(0.8), Generator())
    token = _serve_request_context.set(_RequestContext(request_id="req-123"))
    try:
        with tracer().start_as_current_span("request") as span:
            request = ChatRequest(user_id="shopper-secret", message="my phone is 555-0199, returns?")
            await chat.answer(chat._config.tenants[0], request)
    finally:
        _serve_request_context.reset(token)
    [line] = [json.loads(text) for text in json_log.getvalue().splitlines()]
    assert line["message"] == "chat request answered" and line["level"] == "INFO"
    assert line["request_id"] == "req-123" and line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert (line["tenant"], line["outcome"], line["deployment"], line["replica"]) == (
        "lumen",
        "answered",
        "Orchestrator",
        "r1",
    )
    assert "555-0199" not in json_log.getvalue() and "shopper-secret" not in json_log.getvalue()


async def test_debug_level_adds_the_shoppers_message(span_exporter: Any) -> None:
    with platform_logs("DEBUG", "text") as stream:
        chat = ChatPipeline(OrchestratorConfig.model_validate(orchestrator_args()), Retriever(0.8), Generator())
        await chat.answer(chat._config.tenants[0], ChatRequest(user_id="u-9", message="returns please"))
    assert "'returns please'" in stream.getvalue() and "'u-9'" in stream.getvalue()


# --- spans and metrics of the pipeline --------------------------------------------------------------


async def test_one_request_is_one_span_tree_with_its_tool_calls(span_exporter: Any) -> None:
    seen_headers: list[httpx.Headers] = []

    def storefront(request: httpx.Request) -> httpx.Response:
        seen_headers.append(request.headers)
        return httpx.Response(200, json={"order_id": "LH-1001", "status": "shipped"})

    config = OrchestratorConfig.model_validate(orchestrator_args(tools=tools_config("http://shop.test")))
    metrics = RecordingMetrics()
    runner = ToolRunner(config.tools, transport=httpx.MockTransport(storefront), metrics=metrics)
    chat = ChatPipeline(config, Retriever(0.1), ToolCallingGenerator(), tools=runner, metrics=metrics)
    span_exporter.clear()
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="Where is my order LH-1001?"))
    assert reply.actions[0]["status"] == "shipped"
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    assert set(spans) == {"cs.chat", "cs.tool_call"}
    root, tool = spans["cs.chat"], spans["cs.tool_call"]
    assert root.parent is None and tool.parent is not None and tool.parent.span_id == root.context.span_id
    assert tool.context.trace_id == root.context.trace_id
    assert {"tool": "get_order_status", "outcome": "ok"}.items() <= dict(tool.attributes or {}).items()
    assert (root.attributes or {})["outcome"] == "answered"
    # The storefront gets the trace context, so its own spans can join the trace.
    [headers] = seen_headers
    assert headers["traceparent"].split("-")[1] == format(root.context.trace_id, "032x")
    assert metrics.tags("cs_tool_call_seconds") == [{"tool": "get_order_status", "outcome": "ok"}]


@pytest.mark.parametrize(
    ("message", "dense", "outcome"),
    [
        ("How long are returns?", 0.8, "answered"),
        ("Capital of France?", 0.1, "fallback"),
        ("我要转人工", 0.8, "handover"),
        ("What do you think about the election?", 0.8, "guardrail"),
    ],
)
async def test_each_request_is_counted_once_by_outcome(message: str, dense: float, outcome: str) -> None:
    from services.chat.analysis import MessageAnalyzer
    from services.chat.intents import IntentClassifier
    from tests.test_intents import KeywordEmbedder

    config = OrchestratorConfig.model_validate(orchestrator_args())
    metrics = RecordingMetrics()
    analyzer = MessageAnalyzer([], 1.0, KeywordEmbedder(), IntentClassifier(config.intents))
    chat = ChatPipeline(config, Retriever(dense), Generator(), analyzer=analyzer, metrics=metrics)
    await chat.answer(config.tenants[0], ChatRequest(user_id="u", message=message))
    assert metrics.tags("cs_requests") == [{"tenant": "lumen", "outcome": outcome}]
    assert metrics.tags("cs_request_seconds") == [{"tenant": "lumen", "outcome": outcome}]
    assert outcome in REQUEST_OUTCOMES


async def test_a_failed_generation_is_counted_as_an_error() -> None:
    from services.errors import GenerationError

    class Failing(Generator):
        async def stream(self, *args: Any, **kwargs: Any) -> Any:
            raise GenerationError("engine died")
            yield  # an async generator

    config = OrchestratorConfig.model_validate(orchestrator_args())
    metrics = RecordingMetrics()
    chat = ChatPipeline(config, Retriever(0.8), Failing(), metrics=metrics)
    with pytest.raises(GenerationError):
        await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))
    assert metrics.tags("cs_requests") == [{"tenant": "lumen", "outcome": "error"}]


async def test_an_abandoned_stream_is_counted_as_cancelled() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args())
    metrics = RecordingMetrics()
    chat = ChatPipeline(config, Retriever(0.8), Generator(), metrics=metrics)
    prepared = await chat.prepare(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))
    stream = aiter(prepared)
    assert isinstance(await anext(stream), str)
    await stream.aclose()  # the client went away mid-answer
    assert metrics.tags("cs_requests") == [{"tenant": "lumen", "outcome": "cancelled"}]


# --- the Grafana dashboard -----------------------------------------------------------------------------


def test_the_grafana_dashboard_plots_every_metric_and_only_real_ones() -> None:
    dashboard = json.loads((REPO_ROOT / "k8s" / "base" / "grafana" / "cs-platform-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for e in exprs for name in re.findall(r"\bray_[a-z0-9_]+", e)}
    exported = {spec.exported for spec in CATALOG}
    assert used <= exported, f"panels query metrics nobody exports: {used - exported}"
    assert exported <= used, f"metrics without a panel: {exported - used}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "cs-platform"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if p["type"] != "row")


def test_observability_config_names_a_bad_value() -> None:
    from pydantic import ValidationError

    from services.config import ObservabilityConfig

    assert ObservabilityConfig().log_format == "json" and ObservabilityConfig().log_level == "INFO"
    with pytest.raises(ValidationError, match="log_format"):
        ObservabilityConfig.model_validate({"log_format": "xml"})
    with pytest.raises(ValidationError, match="gpu_sample_interval_s"):
        ObservabilityConfig.model_validate({"gpu_sample_interval_s": 0})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ObservabilityConfig.model_validate({"otlp": "x"})
