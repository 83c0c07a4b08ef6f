"""Embedding: the Embedder deployment with and without dynamic batching, and one query in process.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.embedding

1. **Dynamic batching**: 64 concurrent callers (as 64 orchestrator requests would), each
   embedding one shopper question per call, through Serve handles to the Embedder
   deployment of the dev config (multilingual-e5-small on the CPU): once with batches of up
   to ``max_batch_size`` 32 (what queued while the model ran), once with batches of one, and
   once batched in torch (the runtime before).
   Texts/s and call latency.
2. **In process**: the backend's own time (wall and CPU) for one question and for 32: ONNX
   Runtime (the dev config's runtime), torch in float32 and with bfloat16 weights
   (``use_bf16``), and FlagEmbedding's ``encode`` (which runs its first batch twice).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    dev_embedder_args,
    median,
    mixed_questions,
    percentile,
    ray_cluster,
    table,
    write_report,
)

#: The dev embedder's transformers folder, which the ONNX export of the dev config came from.
TORCH_MODEL = REPO_ROOT / "models" / "multilingual-e5-small"


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
    """Milliseconds (wall and CPU) for one query and for 32 questions: each runtime, and FlagEmbedding's encode."""
    import torch
    from FlagEmbedding import FlagModel

    from services.config import EmbedderConfig
    from services.embedder import load_embedding_backend

    torch.set_num_threads(1)  # as in a replica with num_cpus < 2 (Ray sets OMP_NUM_THREADS=1)
    os.environ["OMP_NUM_THREADS"] = "1"  # what the ONNX Runtime backend reads, as in a replica
    onnx = load_embedding_backend(EmbedderConfig.model_validate(embedder_args(32)))
    torch_args = embedder_args(32) | {"model": str(TORCH_MODEL), "runtime": "torch"}
    half = load_embedding_backend(EmbedderConfig.model_validate(torch_args | {"use_bf16": True}))
    exact = load_embedding_backend(EmbedderConfig.model_validate(torch_args | {"use_bf16": False}))
    flag = FlagModel(
        torch_args["model"],
        pooling_method=torch_args.get("pooling_method", "cls"),
        query_instruction_for_retrieval=torch_args.get("query_instruction"),
        normalize_embeddings=True,
        use_fp16=False,  # its default is True
        devices="cpu",
    )
    rows = []
    for label, encode in (
        ("ONNX Runtime (dev config), float32", lambda texts: onnx.encode(texts, "query")),
        ("torch one pass, float32", lambda texts: exact.encode(texts, "query")),
        ("torch one pass, bfloat16", lambda texts: half.encode(texts, "query")),
        ("FlagEmbedding encode_queries, float32", lambda texts: flag.encode_queries(texts)),
    ):
        row: list[Any] = [label]
        for texts, times in (([mixed_questions()[0]], repeats), (mixed_questions()[:32], max(3, repeats // 10))):
            encode(texts)  # warm-up
            walls, cpus = [], []
            for _ in range(times):
                started, cpu = time.perf_counter(), time.process_time()
                encode(texts)
                walls.append((time.perf_counter() - started) * 1000)
                cpus.append((time.process_time() - cpu) * 1000)
            row += [median(walls), median(cpus)]
        rows.append(row)
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
        torch_args = {"model": str(TORCH_MODEL), "runtime": "torch"}
        for label, batch, overrides in (
            ("dynamic batching (dev config: ONNX Runtime)", 32, {}),
            ("batches of one (ONNX Runtime)", 1, {}),
            ("dynamic batching, torch float32", 32, torch_args),
        ):
            config = EmbedderConfig.model_validate(embedder_args(batch) | overrides)
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
    ax.bar([r[0].split(" (")[0] for r in rows], [r[2] for r in rows], color=["tab:green", "tab:gray", "tab:blue"])
    ax.set_ylabel("texts/s")
    model = Path(embedder_args(32)["model"]).name
    ax.set_title(f"Embedder, {args.callers} concurrent callers ({model}, CPU): {ratio:.1f}x")
    sections = [
        f"## Dynamic batching\n\n{args.callers} concurrent callers x {args.calls_each} calls of one question each, "
        f"through Serve handles to one Embedder replica ({model}, CPU, dev config).\n\n"
        + table(["Embedder", "max_batch_size", "texts/s", "call p50 ms", "call p99 ms"], rows)
        + f"\n\nBatched / unbatched throughput (ONNX Runtime): **{ratio:.2f}x**.",
        "## In process (one thread)\n\nMedian milliseconds of wall and CPU time for one question and for 32 "
        "questions in one call (English and Chinese).\n\n"
        + table(["path", "1 question ms", "1 question CPU ms", "32 questions ms", "32 questions CPU ms"], single),
    ]
    write_report(
        "embedding", "Embedding: dynamic batching", "python -m benchmarks.embedding", sections, {"batching": figure}
    )


if __name__ == "__main__":
    main()
