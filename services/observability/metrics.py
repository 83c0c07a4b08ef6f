"""The catalog of every metric the platform exports, and the objects that record them.

Metrics recorded inside Ray Serve replicas go through ``ray.serve.metrics`` and reach
Prometheus at each node's Ray metrics endpoint, named ``ray_<name>`` (counters end in
``_total``) and tagged by Ray with ``application``, ``deployment`` and ``replica``. The
knowledge-sync CLI runs outside Ray and uses prometheus-client instead
(``knowledge_sync/runner.py``). vLLM's own engine metrics are exported next to ours
through vLLM's Ray stat logger.

Every metric is declared once in :data:`CATALOG`; the metric table of docs/observability.md and the scrape
test are checked against it, and recording a metric that is not in it, or with other
labels, is an error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

Kind = Literal["counter", "histogram", "gauge"]

#: Seconds, from a cache hit to a long generation on a CPU box.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS_PER_SECOND_BUCKETS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)
BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)

#: Values of the ``outcome`` label of ``cs_requests``: a closed set, so the label stays bounded.
REQUEST_OUTCOMES = ("answered", "fallback", "handover", "guardrail", "tool_failed", "error", "cancelled")
#: Values of the ``reason`` label of ``cs_withheld_replies``.
WITHHELD_REASONS = ("no_citation", "unsupported_number", "undecodable", "fragment", "wrong_language")
#: Values of the ``reason`` label of ``cs_reply_retries``.
RETRY_REASONS = ("fragment", "wrong_language")
#: Values of the ``stage`` label of ``cs_stage_seconds``.
STAGES = ("embed", "retrieve", "rerank", "generate", "first_token")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        name: Name as recorded (Prometheus shows ``ray_<name>``).
        kind: Counter, histogram or gauge.
        labels: Our labels (Ray adds application, deployment and replica).
        description: What it measures.
        where: The deployment (or process) that records it.
        when: When it appears: "always" once the deployment has served a request, or the
            condition under which it exists at all.
        boundaries: Histogram bucket bounds.
        source: "cs" for ours, "vllm" for vLLM's engine metrics (exported by vLLM itself).

    """

    name: str
    kind: Kind
    labels: tuple[str, ...]
    description: str
    where: str
    when: str = "always"
    boundaries: tuple[float, ...] = ()
    source: Literal["cs", "vllm"] = "cs"

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes (histograms add ``_bucket``, ``_sum``, ``_count``)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


GPU_ONLY = "only in replicas with num_gpus > 0 on a host with an NVIDIA driver"


def _vllm(name: str, kind: Kind, description: str) -> MetricSpec:
    """One of vLLM's engine metrics, recorded by vLLM in the LLM replica."""
    return MetricSpec(name, kind, ("model_name", "engine"), description, "LLM", source="vllm")


CATALOG: tuple[MetricSpec, ...] = (
    # Orchestrator: whole requests and the stages as the request sees them (queueing included).
    MetricSpec(
        "cs_requests", "counter", ("tenant", "outcome"),
        "Chat requests (/v1/chat and /v1/chat/completions) by tenant and outcome: " + ", ".join(REQUEST_OUTCOMES)
        + ".", "Orchestrator",
    ),
    MetricSpec(
        "cs_withheld_replies", "counter", ("tenant", "reason"),
        "Generated answers not given (the fallback sentence instead): no_citation (cites no shown entry), "
        "unsupported_number (states a number no shown entry holds), undecodable (the reply held no text), "
        "fragment or wrong_language (its plain-text retry was still a bare value or title, or in another language "
        "than the shopper's).",
        "Orchestrator", when="after an answer is withheld",
    ),
    MetricSpec(
        "cs_reply_retries", "counter", ("tenant", "reason"),
        "Generated answers asked for again in plain text before anything was shown: fragment (a bare value, a "
        "word or an entry's title) or wrong_language (not in the shopper's language).",
        "Orchestrator", when="after an answer is retried",
    ),
    MetricSpec(
        "cs_request_seconds", "histogram", ("tenant", "outcome"),
        "Whole chat request, from the API call to the last streamed byte.", "Orchestrator",
        boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_stage_seconds", "histogram", ("stage",),
        "Latency of one pipeline stage as the request sees it: embed (the message), retrieve (Milvus search), "
        "rerank (the cross-encoder, with reranking on), generate (the whole LLM stream), first_token (LLM call to "
        "its first chunk).", "Orchestrator",
        boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_tool_call_seconds", "histogram", ("tool", "outcome"),
        "One tool call against the storefront or CRM (outcome ok or failed).", "Orchestrator",
        when="after a tool call", boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_answer_cache_lookups", "counter", ("tenant", "result"),
        "Answer-cache lookups of first questions (result hit or miss).", "Orchestrator",
        when="with answer_cache on",
    ),
    MetricSpec(
        "cs_feedback", "counter", ("tenant", "verdict"),
        "Feedback verdicts: helpful, not_helpful, resolved, unresolved.", "Orchestrator", when="after feedback",
    ),
    # Orchestrator: the control-plane store (tenants, keys, conversation records).
    MetricSpec(
        "cs_records_written", "counter", ("kind",),
        "Conversation records and feedback written to the control-plane store (kind record or feedback).",
        "Orchestrator", when="with control_plane set, after a write",
    ),
    MetricSpec(
        "cs_record_misses", "counter", ("kind", "reason"),
        "Conversation records or feedback not written: store_unavailable (the write failed; the chat was not "
        "affected) or queue_full (more waiting than control_plane.record_queue_size).",
        "Orchestrator", when="with control_plane set, after a miss",
    ),
    MetricSpec(
        "cs_control_plane_refresh_failures", "counter", (),
        "Reads of the control-plane store's tenants and keys that failed; the replica keeps what it read last.",
        "Orchestrator", when="with control_plane set, after a failed read",
    ),
    MetricSpec(
        "cs_control_plane_revision", "gauge", (),
        "Revision of tenants and keys this replica serves (the same on every replica once a change propagated).",
        "Orchestrator", when="with control_plane set",
    ),
    # LLM: the engine's view of each generation.
    MetricSpec(
        "cs_llm_time_to_first_token_seconds", "histogram", ("adapter",),
        "From the generation request reaching the LLM replica to its first token (adapter base or name@version).",
        "LLM", boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_llm_generation_seconds", "histogram", ("adapter",),
        "Whole generation in the LLM replica.", "LLM", boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_llm_tokens_per_second", "histogram", ("adapter",),
        "Output tokens per second of one generation after its first token.", "LLM",
        boundaries=TOKENS_PER_SECOND_BUCKETS,
    ),
    MetricSpec("cs_llm_prompt_tokens", "counter", ("tenant", "adapter"), "Prompt tokens (tokens in).", "LLM"),
    MetricSpec("cs_llm_completion_tokens", "counter", ("tenant", "adapter"), "Generated tokens (tokens out).", "LLM"),
    MetricSpec(
        "cs_adapter_loads", "counter", ("adapter", "outcome"),
        "LoRA adapters loaded into the engine (outcome ok or error).", "LLM", when="after an adapter is used",
    ),
    MetricSpec(
        "cs_adapter_unloads", "counter", ("adapter", "reason"),
        "LoRA adapters unloaded: evicted (LRU, max_loras) or checked (validation load).", "LLM",
        when="after an eviction or an adapter check",
    ),
    MetricSpec(
        "cs_adapter_load_seconds", "histogram", ("adapter",),
        "Time to load a LoRA adapter into the engine.", "LLM", when="after an adapter is used",
        boundaries=LATENCY_BUCKETS,
    ),
    # Embedder and Retriever: the model and Milvus themselves.
    MetricSpec(
        "cs_embed_batch_seconds", "histogram", ("kind",),
        "One model call on a dynamic batch (kind query or passage).", "Embedder", boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_embed_batch_size", "histogram", ("kind",),
        "Texts per model call (dynamic batching at work).", "Embedder", boundaries=BATCH_SIZE_BUCKETS,
    ),
    MetricSpec(
        "cs_rerank_seconds", "histogram", (),
        "One cross-encoder call on a question's candidate passages.", "Embedder",
        when="with orchestrator.reranking", boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_retriever_search_seconds", "histogram", ("tenant",),
        "One hybrid search in Milvus (all signals and the fusion).", "Retriever", boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_knowledge_ingest_records", "counter", ("tenant", "source", "outcome"),
        "Documents synced through the running app: added, updated, deleted, unchanged, rejected.", "Retriever",
        when="after a knowledge sync through the app",
    ),
    MetricSpec(
        "cs_knowledge_ingest_seconds", "histogram", ("tenant", "source"),
        "One source's sync through the running app (chunk, embed, commit).", "Retriever",
        when="after a knowledge sync through the app", boundaries=LATENCY_BUCKETS,
    ),
    MetricSpec(
        "cs_knowledge_generation", "gauge", ("tenant",),
        "The tenant's committed knowledge generation after the last sync through the app.", "Retriever",
        when="after a knowledge sync through the app",
    ),
    # GPU use, sampled through NVML in replicas that hold GPUs.
    MetricSpec(
        "cs_gpu_utilization_percent", "gauge", ("gpu", "model"),
        "GPU busy time over NVML's last sample period, per GPU of the replica.", "LLM, Embedder",
        when=GPU_ONLY,
    ),
    MetricSpec(
        "cs_gpu_memory_used_bytes", "gauge", ("gpu", "model"), "GPU memory in use (all processes).",
        "LLM, Embedder", when=GPU_ONLY,
    ),
    MetricSpec(
        "cs_gpu_memory_total_bytes", "gauge", ("gpu", "model"), "GPU memory in all.", "LLM, Embedder", when=GPU_ONLY,
    ),
    # vLLM's engine metrics (its Ray stat logger; names sanitized from vllm:...).
    _vllm("vllm_kv_cache_usage_perc", "gauge", "KV-cache blocks in use (0..1)."),
    _vllm("vllm_num_requests_running", "gauge", "Requests in the running batch."),
    _vllm("vllm_num_requests_waiting", "gauge", "Requests queued in the engine."),
    _vllm("vllm_request_queue_time_seconds", "histogram", "Time requests waited in the engine's queue."),
)  # fmt: skip

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOG}


def check(name: str, tags: Mapping[str, str]) -> MetricSpec:
    """The spec of ``name``, after checking that ``tags`` carries exactly its labels.

    Raises:
        ValueError: unknown metric or other labels; a programming error, found by unit tests.

    """
    spec = SPECS.get(name)
    if spec is None or spec.source != "cs":
        raise ValueError(f"metric {name!r} is not in the catalog")
    if set(tags) != set(spec.labels):
        raise ValueError(f"metric {name} takes labels {sorted(spec.labels)}, got {sorted(tags)}")
    return spec


class Metrics:
    """Records catalog metrics. This base checks names and labels and records nothing.

    Used where no Ray metrics exist (unit tests, code outside replicas);
    :class:`RayMetrics` records for real.
    """

    def inc(self, name: str, tags: Mapping[str, str], value: float = 1.0) -> None:
        """Add ``value`` to a counter."""
        check(name, tags)

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        """Record one histogram observation."""
        check(name, tags)

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        """Set a gauge."""
        check(name, tags)


class GaugeKeeper:
    """Re-sets the last value of every gauge of this process, so that gauges stay visible.

    Ray's metrics agent drops a gauge's value once Prometheus has scraped it (see ray PR
    #64633): a gauge set once, or set only while the engine is busy (vLLM's KV-cache use),
    vanishes from the next scrape. Each replica runs :meth:`run`, which reports every known
    value again, well within Ray's report interval.

    At most ``max_series`` label sets are kept per gauge, the most recently set: some of
    vLLM's gauges carry changing values as labels (``lora_requests_info`` names the adapters
    running now), and without a bound every combination ever seen would be kept, and
    reported again, forever.
    """

    def __init__(self, max_series: int = 64) -> None:
        self._max_series = max_series
        self._gauges: dict[int, OrderedDict[frozenset[tuple[str, str]], tuple[Any, float, dict[str, str]]]] = {}

    def remember(self, gauge: Any, value: float, tags: Mapping[str, str]) -> None:
        """Note a gauge's new value (after setting it)."""
        series = self._gauges.setdefault(id(gauge), OrderedDict())
        key = frozenset(tags.items())
        series[key] = (gauge, value, dict(tags))
        series.move_to_end(key)
        while len(series) > self._max_series:
            series.popitem(last=False)

    def refresh(self) -> int:
        """Set every remembered value again; returns how many."""
        values = [v for series in list(self._gauges.values()) for v in list(series.values())]
        for gauge, value, tags in values:
            gauge.set(value, tags=tags)
        return len(values)

    async def run(self, interval_s: float = 2.0) -> None:
        """Refresh forever (cancel the task to stop)."""
        import asyncio

        while True:
            await asyncio.sleep(interval_s)
            try:
                self.refresh()
            except Exception as err:  # keep the loop alive; a metric is never worth a crash
                logger.warning("gauge refresh failed: %s: %s", type(err).__name__, err)


#: The process's keeper: our gauges and vLLM's register here.
GAUGES = GaugeKeeper()
_keeper_task: Any = None


def keep_gauges_alive() -> None:
    """Start :data:`GAUGES` refreshing in the running event loop, once per process."""
    import asyncio

    global _keeper_task
    if _keeper_task is None or _keeper_task.done():
        try:
            _keeper_task = asyncio.get_running_loop().create_task(GAUGES.run())
        except RuntimeError:  # no loop here (a synchronous constructor): nothing to keep
            logger.debug("no event loop: gauges are not refreshed")


class RayMetrics(Metrics):
    """Catalog metrics on Ray's metrics endpoint (``ray.serve.metrics``), created once per replica.

    With gauges among ``names``, create it inside the replica's event loop: it starts the
    :data:`GAUGES` refresher there.
    """

    def __init__(self, names: Iterable[str]) -> None:
        from ray.serve import metrics as serve_metrics

        names = list(names)
        if any(SPECS[name].kind == "gauge" for name in names):
            keep_gauges_alive()

        self._metrics: dict[str, Any] = {}
        for name in names:
            spec = SPECS[name]
            tag_keys: Any = spec.labels  # Ray annotates Tuple[str]
            if spec.kind == "counter":
                self._metrics[name] = serve_metrics.Counter(name, description=spec.description, tag_keys=tag_keys)
            elif spec.kind == "gauge":
                self._metrics[name] = serve_metrics.Gauge(name, description=spec.description, tag_keys=tag_keys)
            else:
                self._metrics[name] = serve_metrics.Histogram(
                    name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=tag_keys
                )

    def inc(self, name: str, tags: Mapping[str, str], value: float = 1.0) -> None:
        """Add ``value`` to a counter (nothing for 0: Ray's counters refuse it)."""
        check(name, tags)
        if value > 0:
            self._record(name, "inc", value, tags)

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        """Record one histogram observation."""
        check(name, tags)
        self._record(name, "observe", value, tags)

    def set(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        """Set a gauge."""
        check(name, tags)
        self._record(name, "set", value, tags)
        GAUGES.remember(self._metrics[name], value, tags)

    def _record(self, name: str, method: str, value: float, tags: Mapping[str, str]) -> None:
        try:
            getattr(self._metrics[name], method)(value, tags=dict(tags))
        except Exception as err:  # a metric must never fail the request it describes
            logger.warning("metric %s not recorded: %s: %s", name, type(err).__name__, err)


def names_for(where: str) -> list[str]:
    """Our metrics recorded by one deployment (``where`` as in the catalog)."""
    return [s.name for s in CATALOG if s.source == "cs" and where in s.where.split(", ")]


def adapter_label(adapter: str | None) -> str:
    """The ``adapter`` label: ``base`` for the base model."""
    return adapter or "base"
