"""The Embedder's batches: what queued while the model ran goes in together, a lone text at once; one text
the model cannot read fails alone, the others of its batch still get their vectors. Its health checks run
the model only when it has not answered lately."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.config import EmbedderConfig
from services.embedder import Embedder
from services.errors import DependencyUnavailableError, InvalidRequestError
from services.schemas import Embedding
from tests.conftest import RecordingMetrics


class PickyBackend:
    """Encodes any text but those holding ``poison``, as a tokenizer fails on a lone surrogate."""

    dimension, has_sparse, max_length = 2, False, 16

    def __init__(self, poison: str = "\ud800", down: bool = False, gate: threading.Event | None = None) -> None:
        self.poison, self.down, self.gate = poison, down, gate
        self.calls: list[int] = []
        self.busy = threading.Event()  # set while the first call runs

    def encode(self, texts: list[str], kind: str) -> list[Embedding]:
        self.calls.append(len(texts))
        if self.gate is not None and len(self.calls) == 1:
            self.busy.set()
            self.gate.wait(10)  # the model is busy until the test lets it go
        if self.down or any(self.poison in t for t in texts):
            raise UnicodeEncodeError("utf-8", self.poison, 0, 1, "surrogates not allowed")
        return [Embedding(dense=[float(len(t)), 1.0]) for t in texts]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(t) for t in texts]


async def embedder(backend: PickyBackend, **settings: object) -> Embedder:
    config = EmbedderConfig.model_validate({"model": "unused", "family": "dense", "max_batch_size": 64} | settings)
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


async def test_a_lone_text_runs_at_once_and_the_texts_that_came_meanwhile_go_in_together() -> None:
    gate = threading.Event()
    backend = PickyBackend(gate=gate)
    model = await embedder(backend)
    first = asyncio.ensure_future(model.embed(["alone"]))
    assert await asyncio.to_thread(backend.busy.wait, 10)  # started with nothing else to wait for
    rest = [asyncio.ensure_future(model.embed([f"question {n}"])) for n in range(5)]
    await asyncio.sleep(0)  # let them queue
    gate.set()
    await asyncio.gather(first, *rest)
    assert backend.calls == [1, 5]


async def test_a_caller_that_went_away_is_left_out_of_the_next_batch() -> None:
    gate = threading.Event()
    backend = PickyBackend(gate=gate)
    model = await embedder(backend)
    first = asyncio.ensure_future(model.embed(["alone"]))
    assert await asyncio.to_thread(backend.busy.wait, 10)
    gone, kept = asyncio.ensure_future(model.embed(["gone"])), asyncio.ensure_future(model.embed(["kept"]))
    await asyncio.sleep(0)
    gone.cancel()
    gate.set()
    [vector] = await kept
    await first
    assert backend.calls == [1, 1] and vector.dense == [4.0, 1.0]


async def test_a_health_check_runs_the_model_only_when_it_has_not_answered_lately() -> None:
    backend = PickyBackend()
    model = await embedder(backend, health_model_check_s=60)
    await model.check_health()
    await model.check_health()
    await model.embed(["a question"])
    await model.check_health()
    assert backend.calls == [1, 1]  # the first check's pass and the question's; the other checks asked nothing


async def test_after_a_failed_call_the_next_health_check_asks_the_model_and_fails() -> None:
    backend = PickyBackend()
    model = await embedder(backend, health_model_check_s=60)
    await model.embed(["a question"])
    backend.down = True
    with pytest.raises(DependencyUnavailableError):
        await model.embed(["another"])
    with pytest.raises(DependencyUnavailableError):
        await model.check_health()
    assert len(backend.calls) == 3


async def test_with_no_grace_every_health_check_runs_the_model() -> None:
    backend = PickyBackend()
    model = await embedder(backend, health_model_check_s=0)
    await model.embed(["a question"])
    await model.check_health()
    await model.check_health()
    assert backend.calls == [1, 1, 1]
