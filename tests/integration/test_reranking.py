"""Reranking through the composed app: the Embedder's cross-encoder reorders the hits and decides.

The cross-encoder is a tiny BERT trained at test time on the pairs below (no reranker
weights ship on PyPI), so which passage a question must end up with is known exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from services.app import build_app
from tests.conftest import embedder_args, llm_args, orchestrator_args, retriever_args
from tests.integration.test_app_http import scraped_series

pytestmark = [pytest.mark.integration, pytest.mark.cpu_platform]

AUTH = {"Authorization": "Bearer test-key"}
ADMIN = {"X-API-Key": "admin-key"}
DOCS = {
    "refunds": ("Refunds", "Refunds reach your original payment method within 5 business days of the return."),
    "shipping": ("Shipping", "Orders ship within 24 hours and delivery takes 2 to 4 days."),
    "warranty": ("Warranty", "Every lamp has a two-year warranty against manufacturing defects."),
}
# Which document answers each question; None: none does.
ANSWERS = {
    "How long until my money is back?": "refunds",
    "退款多久到账？": "refunds",
    "When will my parcel arrive?": "shipping",
    "Who won the football world cup in 2018?": None,
}


def passage(doc_id: str) -> str:
    """The text the pipeline gives the cross-encoder for a one-chunk document."""
    title, text = DOCS[doc_id]
    return f"{title}\n{text}"


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cs_testing.tiny_models import build_tiny_cross_encoder

    pairs = [(q, passage(d), float(d == answer)) for q, answer in ANSWERS.items() for d in DOCS]
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("cross-encoder"), pairs)


@pytest.fixture(scope="module")
def client(
    ray_cluster: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    minilm_dir: Path,
    tiny_llm_dir: Path,
    cross_encoder_dir: Path,
) -> Iterator[httpx.Client]:
    args = {
        "embedder": embedder_args(minilm_dir) | {"reranker": {"model": str(cross_encoder_dir), "max_length": 128}},
        "retriever": retriever_args(tmp_path_factory.mktemp("rerank-milvus") / "kb.db"),
        "llm": llm_args(tiny_llm_dir),
        # The dense gate lets every hit through: what is relevant is the cross-encoder's call alone.
        "orchestrator": orchestrator_args(
            admin_api_keys=["admin-key"], relevance_threshold=0.0, reranking={"candidates": 10, "threshold": 0.5}
        ),
    }
    serve.run(build_app(args), name="cs-rerank", route_prefix="/rerank")
    with httpx.Client(base_url=ray_cluster["http_url"] + "/rerank", timeout=120) as http:
        documents = [{"doc_id": d, "title": title, "text": text} for d, (title, text) in DOCS.items()]
        synced = http.put(
            "/admin/knowledge/lumen/sources/faq", json={"complete": True, "documents": documents}, headers=ADMIN
        )
        assert synced.status_code == 200, synced.text
        yield http
    serve.delete("cs-rerank")


async def test_the_embedder_deployment_scores_pairs_with_its_cross_encoder(client: httpx.Client) -> None:
    embedder = serve.get_deployment_handle("Embedder", "cs-rerank")
    assert (await embedder.info.remote())["has_reranker"] is True
    question = "When will my parcel arrive?"
    scores = await embedder.rerank.remote(question, [passage(d) for d in DOCS])
    assert [round(s) for s in scores] == [0, 1, 0]
    assert await embedder.rerank.remote(question, []) == []


@pytest.mark.parametrize("question", [q for q, answer in ANSWERS.items() if answer])
def test_the_answer_rests_on_the_passage_the_cross_encoder_chose(client: httpx.Client, question: str) -> None:
    reply = client.post("/v1/chat", json={"user_id": "u", "message": question}, headers=AUTH).json()
    assert [s["doc_id"] for s in reply["sources"]] == [ANSWERS[question]]
    assert reply["sources"][0]["score"] > 0.9  # the cross-encoder's score, not MiniLM's cosine
    assert reply["outcome"] == "answered"


def test_a_question_no_passage_answers_gets_the_fallback(client: httpx.Client, ray_cluster: dict[str, Any]) -> None:
    reply = client.post(
        "/v1/chat", json={"user_id": "u", "message": "Who won the football world cup in 2018?"}, headers=AUTH
    ).json()
    assert (reply["outcome"], reply["confidence"], reply["sources"]) == ("fallback", 0.0, [])
    # The reranker's latency reaches Prometheus (Ray exports on its own schedule: poll, bounded).
    deadline = time.monotonic() + 90
    while not any(
        labels.get("application") == "cs-rerank"
        for labels in scraped_series(ray_cluster["metrics_url"]).get("ray_cs_rerank_seconds_count", [])
    ):
        assert time.monotonic() < deadline, "ray_cs_rerank_seconds was never exported"
        time.sleep(1)
