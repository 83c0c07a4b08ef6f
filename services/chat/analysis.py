"""Message analysis: embed the message once, score "about the assistant", classify the intent."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.chat.clients import QueryEmbedder
from services.chat.intents import Classification, IntentClassifier, similarities
from services.schemas import Embedding
from services.sessions import Turn


@dataclass(frozen=True)
class Analysis:
    """What is known about a message before any retrieval."""

    embedding: Embedding  # reused by the retriever: the message is embedded once
    about_assistant: float  # similarity to an assistant-question example if above threshold, else 0
    intent: Classification | None


class MessageAnalyzer:
    """Embeds each message once, recognizes questions about the assistant, and classifies the intent.

    Questions about the assistant itself ("who are you?") have no answer in a policy
    knowledge base; the persona and the tenant's adapter, trained on the brand's identity,
    answer them. Intents and frustration come from :class:`~services.chat.intents.IntentClassifier`.
    """

    def __init__(
        self,
        assistant_examples: list[str],
        threshold: float,
        embedder: QueryEmbedder,
        intents: IntentClassifier | None = None,
    ) -> None:
        self._examples = assistant_examples
        self._threshold = threshold
        self._embedder = embedder
        self._intents = intents
        self._vectors: np.ndarray | None = None

    async def analyze(self, message: str, history: list[Turn] | None = None) -> Analysis:
        """Embed the message (once) and analyze it against the examples and the intent rules."""
        [query] = await self._embedder.embed([message])
        vectors = await self._example_vectors()
        about = 0.0
        if self._examples:
            best = float(similarities(query.dense, vectors[: len(self._examples)]).max())
            about = round(min(best, 1.0), 4) if best >= self._threshold else 0.0
        intent = None
        if self._intents is not None:
            intent = self._intents.classify(message, query.dense, vectors[len(self._examples) :], history or [])
        return Analysis(query, about, intent)

    async def _example_vectors(self) -> np.ndarray:
        """Assistant-question examples, then intent examples, embedded on first use (one row each).

        Not at init: the Embedder may still be starting when this replica starts.
        """
        intent_examples = [text for _, text in self._intents.examples] if self._intents else []
        if self._vectors is None and (self._examples or intent_examples):
            embedded = await self._embedder.embed(self._examples + intent_examples)
            self._vectors = np.asarray([e.dense for e in embedded], dtype=np.float32)
        return self._vectors if self._vectors is not None else np.zeros((0, 0), dtype=np.float32)
