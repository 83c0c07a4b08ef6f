"""Embedding: the Embedder deployment with and without dynamic batching, and one query in process.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.embedding

1. **Dynamic batching**: 64 concurrent callers (as 64 orchestrator requests would), each
   embedding one shopper question per call, through Serve handles to the Embedder
   deployment of the dev config (multilingual-e5-small on the CPU): once with batches of up
   to ``max_batch_size`` 32 (what queued while the model ran) and once with batches of one.
   Texts/s and call latency.
2. **One query in process**: the backend's own time for one query: its one-pass path with
   bfloat16 weights (``use_bf16``) and in float32, and FlagEmbedding's ``encode`` (which
   runs its first batch twice, in float32).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    dev_embedder_args,
    median,
    mixed_questions,
    percentile,
    ray_cluster,
    table,
    write_report,
)


def embedder_args(max_batch_size: int) -> dict[str, Any]:
    """The dev config's Embedder, with the given batch bound."""
    return dev_embedder_args() | {"max_batch_size": max_batch_size}


async def load(handle: Any, callers: int, calls_each: int) -> tuple[float, list[float]]:
    """``callers`` concurrent callers, each sending ``calls_each`` one-text calls; (wall s, call latencies)."""
    questions = mixed_questions()
    latencies: list[float] = []

    async def caller(n: int) -> None:
        for i in range(calls_each):
            started = time.monotonic()
            await handle.embed.remote([questions[(n + i) % len(questions)]], "query")
            latencies.append(time.monotonic() - started)

    started = time.monotonic()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return time.monotonic() - started, latencies


def in_process(repeats: int) -> list[list[Any]]:
    """Milliseconds for one query: the one-pass path in bfloat16 and in float32, and FlagEmbedding's encode."""
    import torch
    from FlagEmbedding import FlagModel

    from services.config import EmbedderConfig
    from services.embedder import load_embedding_backend

    torch.set_num_threads(1)  # as in a replica with num_cpus < 2 (Ray sets OMP_NUM_THREADS=1)
    half = load_embedding_backend(EmbedderConfig.model_validate(embedder_args(32) | {"use_bf16": True}))
    exact = load_embedding_backend(EmbedderConfig.model_validate(embedder_args(32) | {"use_bf16": False}))
    args = embedder_args(32)
    flag = FlagModel(
        args["model"],
        pooling_method=args.get("pooling_method", "cls"),
        query_instruction_for_retrieval=args.get("query_instruction"),
        normalize_embeddings=True,
        use_fp16=False,  # its default is True
        devices="cpu",
    )
    question = [mixed_questions()[0]]
    rows = []
    for label, call in (
        ("backend.encode (one pass, bfloat16)", lambda: half.encode(question, "query")),
        ("backend.encode (one pass, float32)", lambda: exact.encode(question, "query")),
        ("FlagEmbedding encode_queries (float32)", lambda: flag.encode_queries(question)),
    ):
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            timings.append((time.perf_counter() - started) * 1000)
        rows.append([label, median(timings), percentile(timings, 99)])
    return rows


def main() -> None:
    """Measure both ways and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--calls-each", type=int, default=8)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ray import serve

    from services.config import EmbedderConfig
    from services.embedder import build_embedder

    single = in_process(50)
    rows = []
    with ray_cluster():
        for label, batch in (("dynamic batching (dev config)", 32), ("batches of one", 1)):
            config = EmbedderConfig.model_validate(embedder_args(batch))
            handle = serve.run(build_embedder(config), name="embedder-bench", route_prefix=None)
            asyncio.run(load(handle, 8, 2))  # warm-up
            wall, latencies = asyncio.run(load(handle, args.callers, args.calls_each))
            texts = args.callers * args.calls_each
            rows.append(
                [label, batch, texts / wall, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000]
            )
            print(f"{label}: {rows[-1]}", file=sys.stderr)
            serve.delete("embedder-bench")
    ratio = rows[0][2] / rows[1][2]
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r[0] for r in rows], [r[2] for r in rows], color=["tab:green", "tab:gray"])
    ax.set_ylabel("texts/s")
    model = Path(embedder_args(32)["model"]).name
    ax.set_title(f"Embedder, {args.callers} concurrent callers ({model}, CPU): {ratio:.1f}x")
    sections = [
        f"## Dynamic batching\n\n{args.callers} concurrent callers x {args.calls_each} calls of one question each, "
        f"through Serve handles to one Embedder replica ({model}, CPU, dev config).\n\n"
        + table(["Embedder", "max_batch_size", "texts/s", "call p50 ms", "call p99 ms"], rows)
        + f"\n\nBatched / unbatched throughput: **{ratio:.2f}x**.",
        "## One query in process (one thread)\n\n" + table(["path", "median ms", "p99 ms"], single),
    ]
    write_report(
        "embedding", "Embedding: dynamic batching", "python -m benchmarks.embedding", sections, {"batching": figure}
    )


if __name__ == "__main__":
    main()
