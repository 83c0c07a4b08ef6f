"""Retriever on real Milvus Lite: hybrid search, tenant isolation, outages."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from cs_testing.knowledge import sync_complete
from services.config import EmbedderConfig, RetrieverConfig
from services.embedder import EmbeddingBackend, build_embedder, load_embedding_backend
from services.errors import InvalidRequestError, KnowledgeBaseUnavailableError
from services.knowledge.documents import KnowledgeDocument
from services.knowledge.store import MilvusKnowledgeStore
from services.retriever import build_retriever
from tests.conftest import embedder_args, retriever_args

pytestmark = pytest.mark.integration

LUMEN_DOCS = [
    KnowledgeDocument(doc_id="returns", title="Returns", text="Items can be returned within 7 days of delivery."),
    KnowledgeDocument(doc_id="hours", title="Service hours", text="Agents are available from 9:00 to 22:00 daily."),
    KnowledgeDocument(doc_id="pwd", title="忘记密码", text="忘记密码时，在登录页点击忘记密码，用验证码重置。"),
]
OTHER_DOCS = [
    KnowledgeDocument(doc_id="returns", title="Returns", text="Items can be returned within 30 days of delivery."),
]


@pytest.fixture(scope="module")
def backend(minilm_dir: Path) -> EmbeddingBackend:
    return load_embedding_backend(EmbedderConfig.model_validate(embedder_args(minilm_dir)))


@pytest.fixture(scope="module")
def milvus_path(tmp_path_factory: pytest.TempPathFactory, backend: EmbeddingBackend) -> Path:
    path = tmp_path_factory.mktemp("milvus") / "kb.db"
    store = MilvusKnowledgeStore(RetrieverConfig.model_validate(retriever_args(path)), dimension=384, has_sparse=False)
    try:
        report = sync_complete(store, backend, "lumen", "test", LUMEN_DOCS)
        assert (report.added, report.chunks_embedded) == (3, 3)
        sync_complete(store, backend, "other", "test", OTHER_DOCS)
        again = sync_complete(store, backend, "lumen", "test", LUMEN_DOCS[:2])
        assert (again.chunks_embedded, again.unchanged, again.deleted) == (0, 2, 1)
        sync_complete(store, backend, "lumen", "test", LUMEN_DOCS)
    finally:
        store.close()
    return path


@pytest.fixture(scope="module")
def retriever(ray_cluster: dict[str, Any], minilm_dir: Path, milvus_path: Path) -> Iterator[Any]:
    embedder = build_embedder(EmbedderConfig.model_validate(embedder_args(minilm_dir)))
    app = build_retriever(RetrieverConfig.model_validate(retriever_args(milvus_path)), embedder)
    handle = serve.run(app, name="retriever-test", route_prefix=None)
    yield handle
    serve.delete("retriever-test")


async def test_hits_carry_scores_and_rank_the_right_chunk_first(retriever: Any) -> None:
    found = await retriever.search.remote("lumen", "How many days do I have to return an item?", 3)
    hits = found.hits
    assert hits[0].chunk.doc_id == "returns"
    assert hits[0].dense_score > 0.4
    assert hits[0].bm25_score is not None and hits[0].bm25_score > 0
    assert hits[0].score >= hits[-1].score > 0


async def test_bm25_finds_chinese_text(retriever: Any) -> None:
    hits = (await retriever.search.remote("lumen", "我忘记密码了", 3)).hits
    assert any(h.chunk.doc_id == "pwd" and h.bm25_score for h in hits)


async def test_a_tenant_never_sees_another_tenants_chunks(retriever: Any) -> None:
    lumen = (await retriever.search.remote("lumen", "return within days", 10)).hits
    other = (await retriever.search.remote("other", "return within days", 10)).hits
    assert {h.chunk.tenant for h in lumen} == {"lumen"} and len(lumen) == 3
    assert [(h.chunk.tenant, h.chunk.text) for h in other] == [("other", OTHER_DOCS[0].text)]
    nobody = await retriever.search.remote("nobody", "return within days", 10)
    assert nobody.hits == [] and nobody.dense_candidates == []


async def test_filter_injection_is_refused(retriever: Any) -> None:
    with pytest.raises(InvalidRequestError, match="invalid tenant id"):
        await retriever.search.remote('lumen" or tenant != "', "returns", 3)


def test_milvus_outage_is_an_error_not_an_empty_result(tmp_path: Path, backend: EmbeddingBackend) -> None:
    store = MilvusKnowledgeStore(
        RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db")), dimension=384, has_sparse=False
    )
    sync_complete(store, backend, "lumen", "test", LUMEN_DOCS[:1])
    query = backend.encode(["returns"], "query")[0]
    assert store.search("lumen", "returns", query, 3).hits
    store.close()  # the Lite server process is gone now
    with pytest.raises(KnowledgeBaseUnavailableError, match=r"Milvus .* failed"):
        store.search("lumen", "returns", query, 3)
    with pytest.raises(KnowledgeBaseUnavailableError):
        store.ping()


def test_unreachable_milvus_server_fails_fast() -> None:
    config = RetrieverConfig.model_validate({"milvus_uri": "http://127.0.0.1:9", "timeout_s": 3})
    with pytest.raises(KnowledgeBaseUnavailableError, match="unavailable"):
        MilvusKnowledgeStore(config, dimension=384, has_sparse=False)


def test_dimension_mismatch_is_reported(tmp_path: Path) -> None:
    config = RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db"))
    MilvusKnowledgeStore(config, dimension=384, has_sparse=False).close()
    with pytest.raises(KnowledgeBaseUnavailableError, match="holds 384-dim vectors but the embedder gives 768"):
        MilvusKnowledgeStore(config, dimension=768, has_sparse=False)


def test_searches_reuse_the_generation_and_see_a_commit_of_their_own_store_at_once(
    tmp_path: Path, backend: EmbeddingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db") | {"generation_cache_s": 30})
    store = MilvusKnowledgeStore(config, dimension=384, has_sparse=False)
    try:
        sync_complete(store, backend, "lumen", "test", LUMEN_DOCS)
        reads = 0
        read_state = store.tenant_state

        def counted(tenant: str) -> Any:
            nonlocal reads
            reads += 1
            return read_state(tenant)

        monkeypatch.setattr(store, "tenant_state", counted)
        [query] = backend.encode(["How many days do I have to return an item?"], "query")
        for _ in range(5):
            assert store.search("lumen", "return", query, 3).hits[0].chunk.text == LUMEN_DOCS[0].text
        assert reads == 0  # the commit left its generation for the searches

        changed = LUMEN_DOCS[0].model_copy(update={"text": "Items can be returned within 15 days of delivery."})
        sync_complete(store, backend, "lumen", "test", [changed, *LUMEN_DOCS[1:]])
        texts = {hit.chunk.text for hit in store.search("lumen", "return", query, 10).hits}
        assert changed.text in texts and LUMEN_DOCS[0].text not in texts
    finally:
        store.close()


def test_the_dense_candidates_are_the_dense_signals_own_whatever_fusion_keeps(
    tmp_path: Path, backend: EmbeddingBackend
) -> None:
    config = RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db") | {"candidates_per_signal": 4})
    store = MilvusKnowledgeStore(config, dimension=384, has_sparse=False)
    try:
        docs = [
            *LUMEN_DOCS,
            KnowledgeDocument(doc_id="gift", title="Gift cards", text="Gift cards never expire."),
            KnowledgeDocument(doc_id="fees", title="Return fees", text="Return shipping is free for members."),
        ]
        sync_complete(store, backend, "lumen", "test", docs)
        [query] = backend.encode(["return shipping fee"], "query")
        found = store.search("lumen", "return shipping fee", query, 2)
        passages = backend.encode([f"{d.title}\n{d.text}" for d in docs], "passage")
        exact = sorted((sum(p * q for p, q in zip(query.dense, v.dense, strict=True)) for v in passages), reverse=True)
        assert found.dense_candidates == pytest.approx(exact[:4], abs=1e-3)  # its own four, best first
        assert len(found.hits) == 2  # of which fusion kept two
    finally:
        store.close()


def test_with_no_generation_cache_every_search_reads_the_state(tmp_path: Path, backend: EmbeddingBackend) -> None:
    config = RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db") | {"generation_cache_s": 0})
    store = MilvusKnowledgeStore(config, dimension=384, has_sparse=False)
    try:
        sync_complete(store, backend, "lumen", "test", LUMEN_DOCS)
        calls: list[str] = []
        read_state = store.tenant_state
        store.tenant_state = lambda tenant: calls.append(tenant) or read_state(tenant)  # type: ignore[method-assign]
        [query] = backend.encode(["Service hours"], "query")
        for _ in range(3):
            store.search("lumen", "hours", query, 3)
        assert calls == ["lumen"] * 3
    finally:
        store.close()


class WithWordWeights:
    """A backend's dense vectors plus sparse weights of hashed words: the shape of BGE-M3's learned sparse output."""

    has_sparse = True

    def __init__(self, backend: EmbeddingBackend) -> None:
        self._backend = backend
        self.dimension = backend.dimension
        self.max_length = backend.max_length

    def encode(self, texts: list[str], kind: Any) -> list[Any]:
        dense = self._backend.encode(texts, kind)
        return [
            embedding.model_copy(
                update={"sparse": {zlib.crc32(w.encode()) % 30_000: 1.0 for w in text.lower().split()}}
            )
            for text, embedding in zip(texts, dense, strict=True)
        ]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self._backend.count_tokens(texts)


@pytest.mark.parametrize("learned_sparse", [False, True], ids=["dense+bm25", "dense+sparse+bm25"])
def test_a_lite_files_searches_run_in_process_and_find_what_pymilvus_finds(
    tmp_path: Path, backend: EmbeddingBackend, monkeypatch: pytest.MonkeyPatch, learned_sparse: bool
) -> None:
    embedder: Any = WithWordWeights(backend) if learned_sparse else backend
    config = RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db") | {"generation_cache_s": 0})
    store = MilvusKnowledgeStore(config, dimension=384, has_sparse=learned_sparse)
    try:
        sync_complete(store, embedder, "lumen", "test", LUMEN_DOCS)
        sync_complete(store, embedder, "other", "test", OTHER_DOCS)
        questions = ["How many days do I have to return an item?", "忘记密码怎么办", "Service hours"]
        queries = embedder.encode(questions, "query")

        def search_all() -> list[Any]:
            return [store.search("lumen", q, e, 3) for q, e in zip(questions, queries, strict=True)]

        with monkeypatch.context() as no_grpc:  # Milvus Lite's engine answers, not pymilvus over gRPC
            no_grpc.setattr(store._client, "search", lambda *a, **k: pytest.fail("searched over gRPC"))
            in_process = search_all()
        monkeypatch.setattr(store, "_lite", None)  # the same searches through pymilvus
        assert in_process == search_all()
        assert [r.hits[0].chunk.doc_id for r in in_process] == ["returns", "pwd", "hours"]
        assert all(hit.chunk.tenant == "lumen" for r in in_process for hit in r.hits)
        assert any(hit.sparse_score is not None for r in in_process for hit in r.hits) is learned_sparse
    finally:
        store.close()
