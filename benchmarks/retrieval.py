"""Retrieval latency in Milvus Lite at 1k, 10k and 100k chunks.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.retrieval

One tenant's knowledge base grows to each size: bilingual FAQ-sized chunks (the knowledge-sync
benchmark's generator) with random unit dense vectors (latency does not depend on what the
vectors mean; embedding 100k chunks on two cores would take over an hour), written and
committed through the store's own sync-run API. Each shopper question (real MiniLM query
embeddings) is then searched as the Retriever deployment searches: dense (FLAT, the dev
config) and BM25 over the jieba-analyzed text, fused by RRF, 20 candidates, filtered to the
tenant's committed generation. Reported: p50/p99 of ``MilvusKnowledgeStore.search``.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import DEV_CONFIG, dev_embedder_args, mixed_questions, percentile, table, write_report
from benchmarks.knowledge_sync import _record_text

TENANT = "bench"


def unit_vector(rng: random.Random, dimension: int) -> list[float]:
    """A random direction."""
    values = [rng.gauss(0, 1) for _ in range(dimension)]
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


def grow(store: Any, rng: random.Random, start: int, stop: int, dimension: int) -> None:
    """Add chunks ``start..stop`` to the tenant in one committed sync run."""
    from services.schemas import Embedding, KnowledgeChunk

    generation = store.begin(TENANT)
    batch: list[KnowledgeChunk] = []
    vectors: list[Embedding] = []
    for n in range(start, stop):
        text = _record_text(rng)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        batch.append(
            KnowledgeChunk(
                id=f"{TENANT}:bench:doc-{n}:0:{digest}", tenant=TENANT, source="bench", doc_id=f"doc-{n}",
                chunk_no=0, title=f"Policy {n}", text=text, content_hash=digest,
            )
        )  # fmt: skip
        vectors.append(Embedding(dense=unit_vector(rng, dimension)))
        if len(batch) == 2000 or n == stop - 1:
            store.stage(batch, vectors, generation)
            batch, vectors = [], []
    store.commit(TENANT, generation, store.tenant_state(TENANT))


def main() -> None:
    """Grow the knowledge base and time searches at each size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the question set per size")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.config import EmbedderConfig, RetrieverConfig
    from services.embedder import FlagEmbeddingBackend
    from services.knowledge.store import MilvusKnowledgeStore

    dev = yaml.safe_load(DEV_CONFIG.read_text())["applications"][0]["args"]
    embedder = FlagEmbeddingBackend(EmbedderConfig.model_validate(dev_embedder_args()))
    questions = mixed_questions()
    queries = [(q, embedder.encode([q], "query")[0]) for q in questions]
    candidates = dev["orchestrator"].get("retrieval_candidates", 20)
    rng = random.Random(11)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cs-retrieval-") as tmp:
        config = RetrieverConfig.model_validate(dev["retriever"] | {"milvus_uri": str(Path(tmp) / "kb.db")})
        store = MilvusKnowledgeStore(config, dimension=embedder.dimension, has_sparse=False)
        size = 0
        for target in (int(s) for s in args.sizes.split(",")):
            started = time.monotonic()
            grow(store, rng, size, target, embedder.dimension)
            size, write_s = target, time.monotonic() - started
            for question, embedding in queries[:4]:  # warm-up
                store.search(TENANT, question, embedding, candidates)
            latencies = []
            for _ in range(args.rounds):
                for question, embedding in queries:
                    t0 = time.perf_counter()
                    hits = store.search(TENANT, question, embedding, candidates)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    assert hits, "every question finds chunks"
            rows.append([size, percentile(latencies, 50), percentile(latencies, 99), len(latencies), write_s])
            print(f"{size} chunks: {rows[-1]}", file=sys.stderr)
        store.close()
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="p50")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], marker="x", label="p99")
    ax.set_xscale("log")
    ax.set_xlabel("chunks of the tenant")
    ax.set_ylabel("search ms")
    ax.legend()
    ax.grid(alpha=0.3)
    sections = [
        "Hybrid search (dense FLAT + BM25, RRF) of one tenant in Milvus Lite, in process "
        f"(the Retriever deployment's own time), {candidates} candidates.\n\n"
        + table(["chunks", "search p50 ms", "search p99 ms", "searches", "time to write the chunks s"], rows)
    ]
    write_report(
        "retrieval", "Retrieval latency in Milvus Lite", "python -m benchmarks.retrieval", sections, {"latency": figure}
    )


if __name__ == "__main__":
    main()
