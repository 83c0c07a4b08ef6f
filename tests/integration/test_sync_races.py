"""Cancelled and concurrent syncs on a real Milvus Lite file: no document lost, never a mixed generation.

The Retriever deployment's own ``ingest`` (its lease, its runs kept to their end) over a real
store; passages are embedded by a stand-in of the Embedder deployment (the embedding model
is not what is tested here, and a hash vector keeps 70 syncs within seconds).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from services.config import RetrieverConfig
from services.errors import ConflictError
from services.knowledge.ingest import SourceBatch
from services.knowledge.store import MilvusKnowledgeStore
from services.retriever import Retriever
from services.schemas import Embedding
from tests.conftest import RecordingMetrics, retriever_args

pytestmark = pytest.mark.integration

DIMENSION = 8


class Call:
    """One deployment call: awaitable (as the Retriever awaits it) and ``.result()`` (as its sync thread waits)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value

    def __await__(self) -> Any:
        async def done() -> Any:
            return self.value

        return done().__await__()


class Method:
    def __init__(self, function: Any) -> None:
        self.function = function

    def remote(self, *args: Any) -> Call:
        return Call(self.function(*args))


def vector(text: str) -> Embedding:
    digest = hashlib.sha256(text.encode()).digest()
    values = [b / 255 + 0.01 for b in digest[:DIMENSION]]
    norm = sum(v * v for v in values) ** 0.5
    return Embedding(dense=[v / norm for v in values])


class EmbedderStandIn:
    """What the Retriever calls of the Embedder deployment."""

    info = Method(lambda: {"dimension": DIMENSION, "has_sparse": False, "max_length": 512})
    embed = Method(lambda texts, kind="query": [vector(t) for t in texts])
    count_tokens = Method(lambda texts: [len(t.split()) for t in texts])


async def retriever(tmp_path: Path) -> Retriever:
    config = RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db"))
    store = MilvusKnowledgeStore(config, dimension=DIMENSION, has_sparse=False)
    replica = Retriever.__new__(Retriever)  # Serve awaits the async constructor; so does this test
    await replica.__init__(config, EmbedderStandIn(), store=store, metrics=RecordingMetrics())  # type: ignore[misc]
    return replica


def pull(label: str, size: int) -> SourceBatch:
    documents = [
        {"doc_id": f"{label}-{n}", "title": f"Rule {label} {n}", "text": f"Rule {n} of set {label}: be kind."}
        for n in range(size)
    ]
    return SourceBatch.model_validate({"complete": True, "documents": documents})


def visible_sets(replica: Retriever) -> set[str]:
    """Which pulls the chunks a search sees now come from (one set label per document)."""
    return {row.doc_id.split("-")[0] for row in replica._store.live_chunks("lumen", "faq")}


async def settled(replica: Retriever) -> None:
    while replica._runs:
        await asyncio.gather(*replica._runs, return_exceptions=True)


async def test_fifty_cancelled_syncs_each_rerun_at_once_lose_nothing_and_never_mix(tmp_path: Path) -> None:
    replica = await retriever(tmp_path)
    rng = random.Random(3)
    refused = 0
    for round_no in range(50):
        first, second = f"a{round_no}", f"b{round_no}"
        caller = asyncio.create_task(replica.ingest("lumen", "faq", pull(first, 20), None, None))
        await asyncio.sleep(rng.uniform(0, 0.05))  # the caller leaves at some point of the run
        caller.cancel()
        try:
            await replica.ingest("lumen", "faq", pull(second, 20), None, None)
        except ConflictError:
            refused += 1  # the abandoned run still held the lease: nothing was changed
        await settled(replica)
        state = replica._store.tenant_state("lumen").sources["faq"]
        seen = visible_sets(replica)
        assert len(seen) == 1 and state.documents == 20, (round_no, seen)  # one whole pull, never a mix
        assert seen <= {first, second}
    assert refused > 0  # the races really happened
    replica._store.close()


async def test_twenty_concurrent_pairs_commit_exactly_one_whole_pull_each(tmp_path: Path) -> None:
    replica = await retriever(tmp_path)
    conflicts = 0
    for pair in range(20):
        labels = (f"x{pair}", f"y{pair}")
        results = await asyncio.gather(
            *(replica.ingest("lumen", "faq", pull(label, 15), None, None) for label in labels),
            return_exceptions=True,
        )
        conflicts += sum(isinstance(r, ConflictError) for r in results)
        assert all(isinstance(r, dict | ConflictError) for r in results), results
        seen = visible_sets(replica)
        assert len(seen) == 1 and seen <= set(labels), (pair, seen)
    assert conflicts >= 10  # at least half of the pairs really ran at once
    replica._store.close()
