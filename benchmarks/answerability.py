"""Retrieval recall and the relevance gate, per embedder, on the evaluation sets of both stores.

Run (after ``cs-fetch-models``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.answerability

Each store's knowledge base (``knowledge_sync/samples``) is synced into a fresh Milvus Lite
file with each embedder, and every question of its evaluation set (``examples/eval``) is
searched as the Retriever searches (dense + BM25, RRF, 20 candidates). Reported per store,
embedder and language: recall@1/@3 of the expected documents among the fused hits, and the
best dense similarity of answerable and of out-of-knowledge questions; then, for a sweep of
relevance thresholds, the share of answerable questions the gate keeps and of
out-of-knowledge questions it refuses. This is what ``relevance_threshold`` is tuned from.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, table, write_report
from cs_testing.cluster import minilm_dir

STORES = {"lumen": "lumen_home", "voltmart": "voltmart_electronics"}
MODELS = REPO_ROOT / "models"


def embedders() -> dict[str, dict[str, Any]]:
    """The embedder configs compared: the multilingual dev default (float32 and bfloat16 weights) and MiniLM."""
    e5 = {
        "model": str(MODELS / "multilingual-e5-small"), "family": "dense", "pooling_method": "mean",
        "query_instruction": "query: ", "passage_instruction": "passage: ", "device": "cpu", "max_length": 512,
    }  # fmt: skip
    return {
        "multilingual-e5-small": e5,
        "multilingual-e5-small-bf16": e5 | {"use_bf16": True},
        "all-MiniLM-L6-v2": {
            "model": str(minilm_dir()), "family": "dense", "pooling_method": "mean", "device": "cpu", "max_length": 256,
        },
    }  # fmt: skip


def measure(store: str, embedder_args: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """Sync the store's knowledge and search each of its questions; one row of scores per question."""
    from cs_testing.knowledge import sync_complete
    from cs_tools.evaluate import ExpectedDocs, load_questions
    from services.config import EmbedderConfig, RetrieverConfig
    from services.embedder import load_embedding_backend
    from services.knowledge.documents import load_documents
    from services.knowledge.store import MilvusKnowledgeStore

    backend = load_embedding_backend(EmbedderConfig.model_validate(embedder_args))
    retriever = RetrieverConfig(milvus_uri=str(workdir / f"{store}.db"), dense_index_type="FLAT")
    kb = MilvusKnowledgeStore(retriever, dimension=backend.dimension, has_sparse=False)
    rows = []
    try:
        sync_complete(
            kb, backend, store, "kb", load_documents(REPO_ROOT / "knowledge_sync" / "samples" / f"{STORES[store]}.json")
        )
        questions = load_questions(REPO_ROOT / "examples" / "eval" / f"{STORES[store]}.yaml").questions
        for question in questions:
            if not (isinstance(question.expect, ExpectedDocs) or question.expect == "out_of_kb"):
                continue
            text = question.messages[-1]
            [embedding] = backend.encode([text], "query")
            found = kb.search(store, text, embedding, 20)
            hits = found.hits
            docs = list(dict.fromkeys(h.chunk.doc_id for h in hits))
            expected = question.expect.docs if isinstance(question.expect, ExpectedDocs) else []
            ranks = [n for n, doc in enumerate(docs, start=1) if doc in expected]
            fused_dense = sorted((h.dense_score for h in hits if h.dense_score is not None), reverse=True)
            dense = found.dense_candidates
            rows.append({
                "language": question.language, "answerable": bool(expected), "rank": ranks[0] if ranks else None,
                "best_dense": dense[0] if dense else 0.0,
                "margin": dense[0] - statistics.median(dense) if dense else 0.0,
                "fused_margin": fused_dense[0] - statistics.median(fused_dense) if fused_dense else 0.0,
            })  # fmt: skip
    finally:
        kb.close()
    return rows


def _rate(values: list[bool]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "-"


def summarize(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Recall and the dense-score spread, per language."""
    out = []
    for language in sorted({r["language"] for r in rows}):
        mine = [r for r in rows if r["language"] == language]
        answerable = [r for r in mine if r["answerable"]]
        outside = [r for r in mine if not r["answerable"]]
        out.append([
            language, len(answerable), _rate([r["rank"] == 1 for r in answerable]),
            _rate([r["rank"] is not None and r["rank"] <= 3 for r in answerable]),
            f"{statistics.median(r['best_dense'] for r in answerable):.3f}" if answerable else "-",
            f"{min(r['best_dense'] for r in answerable):.3f}" if answerable else "-",
            f"{statistics.median(r['best_dense'] for r in outside):.3f}" if outside else "-",
            f"{max(r['best_dense'] for r in outside):.3f}" if outside else "-",
        ])  # fmt: skip
    return out


def sweep(rows: list[dict[str, Any]], thresholds: list[float], key: str = "best_dense") -> list[list[Any]]:
    """For each threshold on ``key``: answerable questions kept, out-of-knowledge ones refused."""
    answerable = [r for r in rows if r["answerable"]]
    outside = [r for r in rows if not r["answerable"]]
    return [
        [f"{t:g}", _rate([r[key] >= t for r in answerable]), _rate([r[key] < t for r in outside])] for t in thresholds
    ]


def main() -> None:
    """Measure every store with every embedder and write ``benchmarks/results/answerability.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--embedder", choices=list(embedders()), help="Only this embedder.")
    args = parser.parse_args()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in embedders().items():
            if args.embedder and name != args.embedder:
                continue
            thresholds = [0.3, 0.4, 0.5] if "MiniLM" in name else [0.80, 0.82, 0.84, 0.85, 0.86, 0.88]
            for store in STORES:
                rows = measure(store, config, Path(tmp) / name.replace("/", "_"))
                header = ["language", "answerable", "recall@1", "recall@3", "median best (ans.)",
                          "min best (ans.)", "median best (out)", "max best (out)"]  # fmt: skip
                sections.append(f"### {store}, {name}\n\n" + table(header, summarize(rows)))
                sections.append(table(["threshold", "answerable kept", "out-of-KB refused"], sweep(rows, thresholds)))
                grid = [0.02, 0.025, 0.0275, 0.03, 0.035, 0.04, 0.05]
                sections.append(
                    "Margin of the best hit over the median of the dense signal's own candidates (the gate's):\n\n"
                    + table(["margin", "answerable kept", "out-of-KB refused"], sweep(rows, grid, key="margin"))
                )
                sections.append(
                    "The same over the dense scores of the fused candidates (the gate before it; BM25 moves it):\n\n"
                    + table(["margin", "answerable kept", "out-of-KB refused"], sweep(rows, grid, key="fused_margin"))
                )
    write_report(
        "answerability",
        "Retrieval recall and the relevance gate per embedder",
        "python -m benchmarks.answerability",
        sections,
        {},
    )


if __name__ == "__main__":
    main()
