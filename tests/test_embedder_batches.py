"""One text the model cannot read fails alone: the others of its ``@serve.batch`` still get their vectors."""

from __future__ import annotations

import asyncio

import pytest

from services.config import EmbedderConfig
from services.embedder import Embedder
from services.errors import DependencyUnavailableError, InvalidRequestError
from services.schemas import Embedding
from tests.conftest import RecordingMetrics

# Serve keeps a method's batch queue across instances, bound to the event loop it was made in.
pytestmark = pytest.mark.asyncio(loop_scope="module")


class PickyBackend:
    """Encodes any text but those holding ``poison``, as a tokenizer fails on a lone surrogate."""

    dimension, has_sparse, max_length = 2, False, 16

    def __init__(self, poison: str = "\ud800", down: bool = False) -> None:
        self.poison, self.down = poison, down
        self.calls: list[int] = []

    def encode(self, texts: list[str], kind: str) -> list[Embedding]:
        self.calls.append(len(texts))
        if self.down or any(self.poison in t for t in texts):
            raise UnicodeEncodeError("utf-8", self.poison, 0, 1, "surrogates not allowed")
        return [Embedding(dense=[float(len(t)), 1.0]) for t in texts]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t) for t in texts]


@pytest.fixture(autouse=True)
def replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``@serve.batch`` reads of the replica it runs in (only its request bound), outside Serve."""
    from types import SimpleNamespace

    from ray import serve

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=1000))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


async def embedder(backend: PickyBackend) -> Embedder:
    config = EmbedderConfig.model_validate(
        {"model": "unused", "family": "dense", "max_batch_size": 64, "batch_wait_timeout_s": 0.05}
    )
    model = Embedder.__new__(Embedder)  # Serve awaits the async constructor; so does this test
    await model.__init__(config, backend=backend, metrics=RecordingMetrics())  # type: ignore[misc]
    return model


async def test_of_64_concurrent_texts_one_unreadable_fails_alone_with_a_400() -> None:
    backend = PickyBackend()
    model = await embedder(backend)
    texts = [f"question {n}" for n in range(64)]
    texts[17] = "bad \ud800 text"
    results = await asyncio.gather(*(model.embed([t]) for t in texts), return_exceptions=True)
    failed = [n for n, r in enumerate(results) if isinstance(r, Exception)]
    assert failed == [17] and isinstance(results[17], InvalidRequestError)
    assert all(r[0].dense == [float(len(texts[n])), 1.0] for n, r in enumerate(results) if n != 17)  # type: ignore[index]
    assert backend.calls[0] > 1  # they really were one batch, retried text by text


async def test_when_the_model_reads_nothing_every_caller_gets_the_outage() -> None:
    model = await embedder(PickyBackend(down=True))
    results = await asyncio.gather(*(model.embed([f"q{n}"]) for n in range(8)), return_exceptions=True)
    assert all(isinstance(r, DependencyUnavailableError) for r in results)


async def test_a_lone_unreadable_text_is_reported_as_the_model_failing() -> None:
    # Alone in its batch there is nothing to compare with: the 400 comes from the API's input check.
    with pytest.raises(DependencyUnavailableError):
        await (await embedder(PickyBackend())).embed(["\ud800"])
