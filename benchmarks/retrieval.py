"""Retrieval latency in Milvus Lite at 1k, 10k and 100k chunks, per dense index type.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev,bench``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.retrieval

For each dense index type (``--indexes``, FLAT and HNSW by default), one tenant's knowledge
base grows to each size: bilingual FAQ-sized chunks (the knowledge-sync benchmark's
generator) with random unit dense vectors (latency does not depend on what the vectors mean;
embedding 100k chunks on two cores would take over an hour), written and committed through
the store's own sync-run API. Each shopper question (real query embeddings of the dev
embedder) is then searched as the Retriever deployment searches: dense and BM25 over the
jieba-analyzed text, fused by RRF, 20 candidates, filtered to the tenant's committed
generation. Reported: p50/p99 of ``MilvusKnowledgeStore.search``, of the dense and the BM25
search alone, and the dense search's recall: the share of the exact cosine top 20 (numpy,
over every vector written) that it returns.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.common import DEV_CONFIG, dev_embedder_args, mixed_questions, percentile, table, write_report
from benchmarks.knowledge_sync import _record_text

TENANT = "bench"


def unit_vector(rng: random.Random, dimension: int) -> list[float]:
    """A random direction."""
    values = [rng.gauss(0, 1) for _ in range(dimension)]
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


def grow(store: Any, rng: random.Random, start: int, stop: int, dimension: int) -> list[list[float]]:
    """Add chunks ``start..stop`` to the tenant in one committed sync run; returns their dense vectors."""
    from services.schemas import Embedding, KnowledgeChunk

    generation = store.begin(TENANT)
    batch: list[KnowledgeChunk] = []
    vectors: list[Embedding] = []
    written: list[list[float]] = []
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
        written.append(vectors[-1].dense)
        if len(batch) == 2000 or n == stop - 1:
            store.stage(batch, vectors, generation)
            batch, vectors = [], []
    store.commit(TENANT, generation, store.tenant_state(TENANT))
    return written


def timed(call: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Milliseconds one call took, and what it returned."""
    started = time.perf_counter()
    result = call(*args)
    return (time.perf_counter() - started) * 1000, result


def exact_top(matrix: np.ndarray, query: list[float], k: int) -> set[int]:
    """Row numbers of the ``k`` rows nearest ``query`` by cosine (rows are unit vectors)."""
    q = np.asarray(query, dtype=np.float32)
    scores = matrix @ (q / np.linalg.norm(q))
    return set(np.argpartition(-scores, k - 1)[:k].tolist())


def main() -> None:
    """Grow the knowledge base and time searches at each size, for each dense index type."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--indexes", default="FLAT,HNSW", help="dense index types to compare")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the question set per size")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.config import EmbedderConfig, RetrieverConfig
    from services.embedder import load_embedding_backend
    from services.knowledge.collections import BM25_FIELD, DENSE_FIELD
    from services.knowledge.store import MilvusKnowledgeStore

    dev = yaml.safe_load(DEV_CONFIG.read_text())["applications"][0]["args"]
    embedder = load_embedding_backend(EmbedderConfig.model_validate(dev_embedder_args()))
    questions = mixed_questions()
    queries = [(q, embedder.encode([q], "query")[0]) for q in questions]
    candidates = dev["orchestrator"].get("retrieval_candidates", 20)
    rows = []
    figure, ax = plt.subplots(figsize=(6, 3.5))
    for index_type in args.indexes.split(","):
        rng = random.Random(11)  # the same chunks and vectors for every index type
        series = []
        with tempfile.TemporaryDirectory(prefix="cs-retrieval-") as tmp:
            settings = dev["retriever"] | {"milvus_uri": str(Path(tmp) / "kb.db"), "dense_index_type": index_type}
            config = RetrieverConfig.model_validate(settings)
            store = MilvusKnowledgeStore(config, dimension=embedder.dimension, has_sparse=False)
            size, written = 0, list[list[float]]()
            for target in (int(s) for s in args.sizes.split(",")):
                write_s, vectors = timed(grow, store, rng, size, target, embedder.dimension)
                size, written = target, written + vectors
                matrix = np.asarray(written, dtype=np.float32)
                for question, embedding in queries[:4]:  # warm-up
                    store.search(TENANT, question, embedding, candidates)
                # The two signals alone, as search() runs them (the same filter and limit).
                visible = store._visible(TENANT, store.tenant_state(TENANT).generation)
                whole, dense, bm25, recall = [], [], [], []
                for _ in range(args.rounds):
                    for question, embedding in queries:
                        ms, hits = timed(store.search, TENANT, question, embedding, candidates)
                        whole.append(ms)
                        assert hits, "every question finds chunks"
                        ms, found = timed(
                            store._search_field, DENSE_FIELD, [embedding.dense], "COSINE", visible, candidates
                        )
                        dense.append(ms)
                        exact = exact_top(matrix, embedding.dense, candidates)
                        got = {int(hit["entity"]["doc_id"].removeprefix("doc-")) for hit in found}
                        recall.append(len(exact & got) / len(exact))
                        ms, _ = timed(store._search_field, BM25_FIELD, [question], "BM25", visible, candidates)
                        bm25.append(ms)
                rows.append(
                    [
                        index_type, size, percentile(whole, 50), percentile(whole, 99), percentile(dense, 50),
                        percentile(bm25, 50), sum(recall) / len(recall), len(whole), write_s / 1000,
                    ]
                )  # fmt: skip
                series.append((size, rows[-1][2]))
                print(f"{index_type} {size} chunks: {rows[-1]}", file=sys.stderr)
            store.close()
        ax.plot([x for x, _ in series], [y for _, y in series], marker="o", label=f"{index_type} p50")
    ax.set_xscale("log")
    ax.set_xlabel("chunks of the tenant")
    ax.set_ylabel("search ms")
    ax.legend()
    ax.grid(alpha=0.3)
    header = [
        "dense index", "chunks", "search p50 ms", "search p99 ms", "dense alone p50 ms", "BM25 alone p50 ms",
        "dense recall@20", "searches", "time to write the chunks s",
    ]  # fmt: skip
    sections = [
        "Hybrid search (dense + BM25, RRF) of one tenant in Milvus Lite, in process "
        f"(the Retriever deployment's own time), {candidates} candidates; each signal alone as the search "
        "runs it; dense recall: the share of the exact cosine top 20 over every vector written that the dense "
        "search returns.\n\n" + table(header, rows)
    ]
    command = "python -m benchmarks.retrieval" + (f" --sizes {args.sizes}" if args.sizes != "1000,10000,100000" else "")
    write_report("retrieval", "Retrieval latency in Milvus Lite", command, sections, {"latency": figure})


if __name__ == "__main__":
    main()
