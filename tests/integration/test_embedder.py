"""Embedder deployment and its backends with the real MiniLM model."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from services.config import EmbedderConfig
from services.embedder import build_embedder
from tests.conftest import embedder_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedder(ray_cluster: dict[str, Any], minilm_dir: Path) -> Iterator[Any]:
    config = EmbedderConfig.model_validate(embedder_args(minilm_dir) | {"query_instruction": "query: "})
    handle = serve.run(build_embedder(config), name="embedder-test", route_prefix=None)
    yield handle
    serve.delete("embedder-test")


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


async def test_vectors_are_normalized_and_dense_only(embedder: Any) -> None:
    [emb] = await embedder.embed.remote(["How long is the return window?"], "query")
    assert len(emb.dense) == 384
    assert norm(emb.dense) == pytest.approx(1.0, abs=1e-3)
    assert emb.sparse is None
    assert await embedder.info.remote() == {
        "dimension": 384,
        "has_sparse": False,
        "max_length": 256,
        "has_reranker": False,
    }


async def test_token_counts_come_from_the_model_tokenizer(embedder: Any) -> None:
    counts = await embedder.count_tokens.remote(["", "refund", "refund to the original payment method", "退货"])
    # WordPiece: "refund" is "ref ##und"; CJK text is one token per character; no [CLS]/[SEP].
    assert counts == [0, 2, 7, 2]


async def test_query_instruction_applies_to_queries_only(embedder: Any) -> None:
    text = "refund to the original payment method"
    [query] = await embedder.embed.remote([text], "query")
    [passage] = await embedder.embed.remote([text], "passage")
    assert query.dense != passage.dense


async def test_concurrent_requests_are_batched_consistently(embedder: Any) -> None:
    texts = [f"question number {n} about shipping" for n in range(12)]
    [alone] = await embedder.embed.remote([texts[3]], "passage")
    results = await asyncio.gather(*(embedder.embed.remote([t], "passage") for t in texts))
    assert [len(r) for r in results] == [1] * len(texts)
    assert results[3][0].dense == pytest.approx(alone.dense, abs=1e-5)
    # Related texts are closer than unrelated ones: the model is real, not random.
    [a, b, c] = await embedder.embed.remote(["return an item", "send a product back", "weather in Paris"], "query")
    dot = lambda x, y: sum(p * q for p, q in zip(x.dense, y.dense, strict=True))  # noqa: E731
    assert dot(a, b) > dot(a, c) + 0.1


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("kind", ["query", "passage"])
def test_dense_backend_gives_flagembeddings_own_vectors(minilm_dir: Path, kind: str, pooling: str) -> None:
    from FlagEmbedding import FlagModel

    from services.embedder import DenseEmbeddingBackend, load_embedding_backend

    config = EmbedderConfig.model_validate(
        embedder_args(minilm_dir)
        | {"query_instruction": "query: ", "passage_instruction": "passage: ", "max_batch_size": 4}
        | {"pooling_method": pooling}
    )
    backend = load_embedding_backend(config)
    assert isinstance(backend, DenseEmbeddingBackend)
    # The third is cut at max_length (512 tokens) by both.
    texts = ["refund to the original payment method", "七天无理由退货", "a much longer sentence " * 200, "x"]
    ours = backend.encode(texts, kind)  # within max_batch_size: one forward pass
    reference_model = FlagModel(
        str(minilm_dir),
        pooling_method=pooling,
        normalize_embeddings=True,
        use_fp16=False,  # FlagModel's default is True: float16 weights
        devices="cpu",
        query_instruction_for_retrieval="query: ",
        passage_instruction_for_retrieval="passage: ",
        query_max_length=config.max_length,
        passage_max_length=config.max_length,
    )
    theirs = (reference_model.encode_queries if kind == "query" else reference_model.encode_corpus)(texts)
    assert len(ours) == len(texts)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.dense == pytest.approx(reference.tolist(), abs=1e-5)
    # Bigger calls are several passes, longest texts first, and come back in the texts' order.
    many = backend.encode(texts * 2, kind)
    for mine, reference in zip(many, ours * 2, strict=True):
        assert mine.dense == pytest.approx(reference.dense, abs=1e-5)
    assert backend.count_tokens(texts) == [
        len(ids) for ids in reference_model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]


def test_dense_backend_does_not_import_flagembedding(minilm_dir: Path) -> None:
    # Its package imports its fine-tuning code (datasets, peft) on the way.
    code = (
        "import sys; from services.config import EmbedderConfig; from services.embedder import load_embedding_backend; "
        f"load_embedding_backend(EmbedderConfig(model={str(minilm_dir)!r}, family='dense')).encode(['x'], 'query'); "
        "print(sorted(m for m in ('FlagEmbedding', 'datasets', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_bfloat16_weights_give_the_float32_vectors_to_within_rounding(minilm_dir: Path) -> None:
    import torch

    from services.embedder import DenseEmbeddingBackend, load_embedding_backend

    texts = ["refund to the original payment method", "七天无理由退货", "a much longer sentence " * 40]
    exact = load_embedding_backend(EmbedderConfig.model_validate(embedder_args(minilm_dir))).encode(texts, "query")
    half = load_embedding_backend(EmbedderConfig.model_validate(embedder_args(minilm_dir) | {"use_bf16": True}))
    assert isinstance(half, DenseEmbeddingBackend) and half.dtype == torch.bfloat16
    auto = load_embedding_backend(EmbedderConfig.model_validate(embedder_args(minilm_dir) | {"use_bf16": "auto"}))
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert isinstance(auto, DenseEmbeddingBackend)
    assert auto.dtype == (torch.bfloat16 if native else torch.float32)
    for reference, vector in zip(exact, half.encode(texts, "query"), strict=True):
        cosine = sum(p * q for p, q in zip(reference.dense, vector.dense, strict=True))
        assert 0.995 < cosine <= 1.0001
