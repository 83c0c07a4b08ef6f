"""The BGE-M3 code path (dense + learned sparse) end to end with Milvus Lite.

No BGE-M3 weights are reachable offline; ``BGEM3FlagModel`` loads the MiniLM folder with
random sparse/ColBERT heads, which exercises exactly our code (sparse vectors out of the
embedder, the sparse field and index in Milvus, the sparse signal in fusion).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cs_testing.knowledge import sync_complete
from services.config import EmbedderConfig, RetrieverConfig
from services.embedder import load_embedding_backend
from services.knowledge.documents import KnowledgeDocument
from services.knowledge.store import MilvusKnowledgeStore
from tests.conftest import embedder_args, retriever_args

pytestmark = pytest.mark.integration


def test_bge_m3_family_gives_sparse_vectors_that_milvus_searches(minilm_dir: Path, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(1)  # the sparse head is randomly initialized: fix it so the weights are non-empty
    backend = load_embedding_backend(EmbedderConfig.model_validate(embedder_args(minilm_dir) | {"family": "bge-m3"}))
    assert backend.has_sparse
    [emb] = backend.encode(["refund to the original payment method"], "query")
    assert emb.sparse and all(isinstance(k, int) and v >= 0 for k, v in emb.sparse.items())
    assert sum(v * v for v in emb.dense) == pytest.approx(1.0, abs=1e-3)

    store = MilvusKnowledgeStore(
        RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db")),
        dimension=backend.dimension,
        has_sparse=True,
    )
    try:
        docs = [
            KnowledgeDocument(doc_id="refund", title="Refunds", text="Refunds go back to the original payment method."),
            KnowledgeDocument(doc_id="hours", title="Hours", text="Agents work from 9:00 to 22:00."),
        ]
        sync_complete(store, backend, "lumen", "test", docs)
        hits = store.search("lumen", "refund payment method", emb, 2).hits
        assert hits[0].chunk.doc_id == "refund"
        assert hits[0].sparse_score is not None
        assert hits[0].dense_score is not None and hits[0].bm25_score is not None
    finally:
        store.close()
