"""End to end: the app over HTTP against the bare vLLM engine, same prompts, same settings.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``; ``--model dev`` also needs
``cs-fetch-models``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.end_to_end --model tiny
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.end_to_end --model dev

In one run, for each concurrency level (closed loop: that many callers, each sending its
next request when the last one ends):

1. **Engine**: vLLM ``AsyncLLM`` alone, in a process of its own, with the engine arguments
   and sampling the app's LLM deployment uses, fed the prompt the app builds for each
   question (persona, the retrieved knowledge entries, the question; chat template applied).
2. **App**: the whole application (embedder, Milvus Lite retriever, LLM, orchestrator) on a
   local Ray cluster, each request a streamed ``POST /v1/chat`` of a new conversation.

Both sides stream; the app's reply reports its prompt and completion tokens, which are
checked against the engine's prompts. Reported: p50/p95/p99 latency, time to first token,
requests/s, output tokens/s, errors, the throughput ratio, the latency the app adds, the
app's own embed and retrieve stage times (from its Prometheus metrics), and memory (PSS of
every process) of each side.
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
    cpu_seconds_by_component,
    load_sample_kb,
    median,
    mixed_questions,
    percentile,
    ray_cluster,
    resolve_model,
    run_python,
    table,
    tree_memory_bytes,
    write_report,
)

API_KEY = "bench-key"
TENANT = "lumen"
#: Report column -> key of :meth:`Level.summary`.
SUMMARY_COLUMNS = {
    "requests": "requests",
    "errors": "errors",
    "req/s": "rps",
    "out tok/s": "tokens_per_s",
    "tokens/answer": "completion_tokens",
    "p50 s": "p50",
    "p95 s": "p95",
    "p99 s": "p99",
    "TTFT p50 s": "ttft_p50",
    "TTFT p95 s": "ttft_p95",
}
OVERHEAD_COLUMNS = [
    "callers",
    "throughput app/engine",
    "added latency p50 ms",
    "added TTFT p50 ms",
    "embed ms",
    "retrieve ms",
    "added TTFT beyond embed+retrieve ms",
]


@dataclass
class Sample:
    """One request's outcome."""

    question: str
    ok: bool = False
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Level:
    """One concurrency level of one side."""

    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # mean seconds per request, app only
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU milliseconds per request by component

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
            "errors": len(self.samples) - len(ok),
            "rps": len(ok) / self.wall_s,
            "tokens_per_s": sum(s.completion_tokens for s in ok) / self.wall_s,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "ttft_p50": percentile(ttfts, 50),
            "ttft_p95": percentile(ttfts, 95),
            "completion_tokens": median(s.completion_tokens for s in ok),
        }


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


# -- the bare engine (a process of its own) -----------------------------------------------


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its children (vLLM's engine core) so far."""
    times = os.times()
    return times.user + times.system + sum(cpu_seconds_by_component().values())


def engine_phase(workdir: Path) -> None:
    """Run the sweep against AsyncLLM alone; write ``engine.json``."""
    from services.config import AppConfig
    from services.vllm_engine import apply_engine_env, engine_args, sampling_params

    settings = json.loads((workdir / "settings.json").read_text())
    config = AppConfig.model_validate(settings["app_args"])
    apply_engine_env(config.llm.engine_env)  # as the LLM deployment does before its engine starts
    from vllm.v1.engine.async_llm import AsyncLLM

    # The rendered chat template as text: the engine tokenizes it, as it would for any client.
    prompts: dict[str, str] = json.loads((workdir / "prompts.json").read_text())
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
            sample.ok = True
        except Exception as err:
            sample.error = f"{type(err).__name__}: {err}"
        sample.latency_s = time.monotonic() - started
        return sample

    async def run() -> list[Level]:
        await sweep_level(send, settings["questions"], 4, 8)  # warm-up
        levels = []
        for concurrency in settings["levels"]:
            n = requests_for(concurrency, settings["per_caller"], settings["least"])
            cpu_before = _own_cpu_seconds()
            level = await sweep_level(send, settings["questions"], concurrency, n)
            level.cpu_ms = {"engine (all processes)": (_own_cpu_seconds() - cpu_before) * 1000 / n}
            levels.append(level)
            print(f"engine c={concurrency}: {level.summary()}", file=sys.stderr)
        return levels

    try:
        levels = asyncio.run(run())
        memory = tree_memory_bytes()
    finally:
        engine.shutdown()
    out = {"memory_bytes": memory, "levels": [asdict(level) for level in levels]}
    (workdir / "engine.json").write_text(json.dumps(out))


# -- the app over HTTP --------------------------------------------------------------------


async def app_send(client: Any, question: str) -> Sample:
    """One streamed ``POST /v1/chat``: time to the first delta event, then the final reply."""
    sample = Sample(question)
    started = time.monotonic()
    body = {"user_id": "bench-shopper", "message": question, "stream": True}
    try:
        async with client.stream("POST", "/v1/chat", json=body) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        if event == "delta" and sample.ttft_s is None:
                            sample.ttft_s = time.monotonic() - started
                        elif event == "final":
                            usage = json.loads(line[6:]).get("usage") or {}
                            sample.prompt_tokens = usage.get("prompt_tokens", 0)
                            sample.completion_tokens = usage.get("completion_tokens", 0)
                            sample.ok = bool(usage)
                            sample.error = "" if usage else "no model call (fallback or standard reply)"
                        elif event == "error":
                            sample.error = line[6:200]
    except Exception as err:
        sample.error = f"{type(err).__name__}: {err}"
    sample.latency_s = time.monotonic() - started
    return sample


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


def stage_means(metrics_url: str, before: dict[str, tuple[float, float]], requests: int) -> dict[str, float]:
    """Mean seconds per stage since ``before``, once every request of the level is counted (≤ 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        after = stage_totals(metrics_url)
        counted = after.get("generate", (0.0, 0.0))[1] - before.get("generate", (0.0, 0.0))[1]
        if counted >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # metrics reach the endpoint once a second (RAY_metrics_report_interval_ms)
    means = {}
    for stage, (total, count) in after.items():
        old_total, old_count = before.get(stage, (0.0, 0.0))
        if count > old_count:
            means[stage] = (total - old_total) / (count - old_count)
    return means


def app_phase(workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Start the app on a local Ray cluster, run the sweep over HTTP; return its levels and memory."""
    import httpx
    from ray import serve

    from services.app import build_app

    with ray_cluster() as cluster:
        started = time.monotonic()
        serve.run(build_app(settings["app_args"]), name="customer-service", route_prefix="/")
        print(f"app ready in {time.monotonic() - started:.0f} s", file=sys.stderr)

        async def run() -> list[Level]:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(
                base_url=cluster["http_url"], headers=headers, timeout=600, limits=limits
            ) as client:

                async def send(question: str) -> Sample:
                    return await app_send(client, question)

                await sweep_level(send, settings["questions"], 4, 8)  # warm-up
                levels = []
                for concurrency in settings["levels"]:
                    n = requests_for(concurrency, settings["per_caller"], settings["least"])
                    before = await asyncio.to_thread(stage_totals, cluster["metrics_url"])
                    cpu_before = cpu_seconds_by_component()
                    level = await sweep_level(send, settings["questions"], concurrency, n)
                    cpu_after = cpu_seconds_by_component()
                    level.cpu_ms = {
                        part: (cpu_after[part] - cpu_before.get(part, 0.0)) * 1000 / n for part in cpu_after
                    }
                    level.stages = await asyncio.to_thread(stage_means, cluster["metrics_url"], before, n)
                    levels.append(level)
                    print(f"app c={concurrency}: {level.summary()}", file=sys.stderr)
                return levels

        levels = asyncio.run(run())
        memory = tree_memory_bytes(include_root=False)  # the Ray processes: every deployment and Ray itself
    return {"memory_bytes": memory, "levels": levels}


def engine_prompts(settings: dict[str, Any], milvus_path: Path) -> dict[str, str]:
    """The prompt the app builds for each question (same retrieval, grounding, chat template), as text."""
    from transformers import AutoTokenizer

    from services.chat.grounding import build_messages, ground
    from services.config import AppConfig
    from services.embedder import FlagEmbeddingBackend
    from services.knowledge.store import MilvusKnowledgeStore

    config = AppConfig.model_validate(settings["app_args"])
    orchestrator = config.orchestrator
    embedder = FlagEmbeddingBackend(config.embedder)
    retriever = config.retriever.model_copy(update={"milvus_uri": str(milvus_path)})
    store = MilvusKnowledgeStore(retriever, dimension=embedder.dimension, has_sparse=embedder.has_sparse)
    tokenizer = AutoTokenizer.from_pretrained(config.llm.model)
    prompts = {}
    try:
        for question in settings["questions"]:
            [embedding] = embedder.encode([question], "query")
            hits = store.search(TENANT, question, embedding, orchestrator.retrieval_candidates)
            grounding = ground(hits, orchestrator.relevance_threshold, orchestrator.retrieval_top_k)
            messages = build_messages(orchestrator.tenants[0].persona, grounding, [], question)
            prompts[question] = tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
            )
    finally:
        store.close()
    return prompts


def cpu_table(engine_levels: list[Level], app_levels: list[Level]) -> str:
    """CPU ms per request of each part at each level, the bare engine's total beside."""
    parts = sorted(
        {part for level in app_levels for part in level.cpu_ms}, key=lambda p: -app_levels[-1].cpu_ms.get(p, 0)
    )
    rows = []
    for eng, ap in zip(engine_levels, app_levels, strict=True):
        total = sum(ap.cpu_ms.values())
        rows.append([ap.concurrency, sum(eng.cpu_ms.values()), total, *(ap.cpu_ms.get(p, 0.0) for p in parts)])
    return table(["callers", "bare engine", "app total", *parts], rows)


def report(model: str, settings: dict[str, Any], engine: dict[str, Any], app: dict[str, Any], command: str) -> None:
    """Tables and plots of both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine_levels = [
        Level(d["concurrency"], d["wall_s"], [Sample(**s) for s in d["samples"]], cpu_ms=d["cpu_ms"])
        for d in engine["levels"]
    ]
    app_levels: list[Level] = app["levels"]
    engine_prompt_tokens = {s.question: s.prompt_tokens for level in engine_levels for s in level.ok}
    mismatched = sorted(
        {(s.question, s.prompt_tokens, engine_prompt_tokens[s.question]) for level in app_levels for s in level.ok}
        - {(q, n, n) for q, n in engine_prompt_tokens.items()}
    )
    rows, overhead_rows = [], []
    for eng, ap in zip(engine_levels, app_levels, strict=True):
        e, a = eng.summary(), ap.summary()
        for side, s in (("engine", e), ("app", a)):
            rows.append([ap.concurrency, side, *(s[key] for key in SUMMARY_COLUMNS.values())])
        stages = ap.stages
        retrieval = stages.get("embed", float("nan")) + stages.get("retrieve", float("nan"))
        overhead_rows.append([
            ap.concurrency, a["tokens_per_s"] / e["tokens_per_s"], (a["p50"] - e["p50"]) * 1000,
            (a["ttft_p50"] - e["ttft_p50"]) * 1000, stages.get("embed", float("nan")) * 1000,
            stages.get("retrieve", float("nan")) * 1000, (a["ttft_p50"] - e["ttft_p50"] - retrieval) * 1000,
        ])  # fmt: skip
    levels = [level.concurrency for level in app_levels]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for side, data in (("engine", engine_levels), ("app", app_levels)):
        summaries = [level.summary() for level in data]
        axes[0].plot(levels, [s["tokens_per_s"] for s in summaries], marker="o", label=side)
        axes[1].plot(levels, [s["p50"] for s in summaries], marker="o", label=f"{side} p50")
        axes[1].plot(levels, [s["p95"] for s in summaries], marker="x", linestyle="--", label=f"{side} p95")
        axes[2].plot(levels, [s["ttft_p50"] * 1000 for s in summaries], marker="o", label=side)
    for ax, label in zip(axes, ("output tokens/s", "latency (s)", "time to first token p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    figure.suptitle(f"app vs bare vLLM engine ({model})")
    memory_gb = (app["memory_bytes"] / 1e9, engine["memory_bytes"] / 1e9)
    sections = [
        f"Model `{model}`, {settings['max_tokens']} tokens at most per answer, greedy; engine environment "
        f"`{settings['app_args']['llm']['engine_env']}` on both sides; "
        f"{len(settings['questions'])} questions (English and Chinese interleaved), each request a new "
        f"conversation. Requests per level: {settings['per_caller']} per caller, at least {settings['least']}. "
        "vLLM's prefix caching is on (its default) on both sides, and each level repeats earlier questions, "
        "so later levels prefill less: compare the sides within a level, not levels with each other. "
        "Questions whose prompt in the app (tokens it reported) differs from the engine's: "
        + (", ".join(f"{q!r} (app {a}, engine {e})" for q, a, e in mismatched) or "none")
        + ".",
        "## Both sides\n\n" + table(["callers", "side", *SUMMARY_COLUMNS], rows),
        "## What the app adds\n\n"
        + table(OVERHEAD_COLUMNS, overhead_rows)
        + "\n\nembed and retrieve: the app's own stage means (`ray_cs_stage_seconds`), queueing included.",
        "## Where the CPU goes\n\nCPU milliseconds per request (user + system, every process), by part: the "
        "profile behind the numbers above. The two cores are shared by everything.\n\n"
        + cpu_table(engine_levels, app_levels),
        f"## Memory\n\nApp (every Ray process: four deployments, controller, proxy, GCS, raylet): "
        f"{memory_gb[0]:.2f} GB PSS; bare engine process: {memory_gb[1]:.2f} GB PSS; "
        f"difference {memory_gb[0] - memory_gb[1]:.2f} GB.",
    ]
    name = f"end_to_end-{Path(model).name}" + "".join(f"-{k}{v}" for k, v in settings["engine_env"].items())
    write_report(name, f"End to end: app vs bare engine ({model})", command, sections, {"sweep": figure})


def main() -> None:
    """Run both phases and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (built now), dev (the 0.5B dev model) or a folder")
    parser.add_argument("--levels", default="1,4,16,64", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--per-caller", type=int, default=2, help="requests per caller at each level")
    parser.add_argument("--least", type=int, default=32, help="fewest requests at a level")
    parser.add_argument(
        "--engine-env", action="append", default=[], metavar="KEY=VALUE", help="extra llm.engine_env, both sides"
    )
    parser.add_argument("--engine-phase", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_phase:
        engine_phase(args.engine_phase)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="cs-bench-") as tmp:
        workdir = Path(tmp)
        model, dtype = resolve_model(args.model, workdir)
        app_args = bench_app_args(model, dtype, workdir / "kb-app.db", args.max_tokens)
        app_args["llm"]["engine_env"] |= dict(item.split("=", 1) for item in args.engine_env)
        load_sample_kb(workdir / "kb-app.db", app_args)
        load_sample_kb(workdir / "kb-engine.db", app_args)
        settings: dict[str, Any] = {
            "app_args": app_args,
            "questions": mixed_questions(),
            "levels": [int(level) for level in args.levels.split(",")],
            "per_caller": args.per_caller,
            "least": args.least,
            "max_tokens": args.max_tokens,
            "engine_env": dict(item.split("=", 1) for item in args.engine_env),
        }
        settings["prompts"] = engine_prompts(settings, workdir / "kb-engine.db")
        (workdir / "prompts.json").write_text(json.dumps(settings["prompts"]))
        (workdir / "settings.json").write_text(json.dumps(settings))
        run_python("benchmarks.end_to_end", "--engine-phase", str(workdir))
        engine = json.loads((workdir / "engine.json").read_text())
        app = app_phase(workdir, settings)
    command = "python -m benchmarks.end_to_end " + " ".join(sys.argv[1:])
    report(args.model, settings, engine, app, command.strip())


if __name__ == "__main__":
    main()
