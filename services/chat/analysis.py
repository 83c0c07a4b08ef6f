"""Message analysis: embed the message once, score "about the assistant", classify the intent."""

from __future__ import annotations

from dataclasses import dataclass

from services.chat.clients import QueryEmbedder
from services.chat.intents import Classification, IntentClassifier
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
        self._vectors: list[list[float]] | None = None

    async def analyze(self, message: str, history: list[Turn] | None = None) -> Analysis:
        """Embed the message (once) and analyze it against the examples and the intent rules."""
        [query] = await self._embedder.embed([message])
        vectors = await self._example_vectors()
        about = 0.0
        if self._examples:
            best = max(sum(a * b for a, b in zip(query.dense, v, strict=True)) for v in vectors[: len(self._examples)])
            about = round(min(best, 1.0), 4) if best >= self._threshold else 0.0
        intent = None
        if self._intents is not None:
            intent = self._intents.classify(message, query.dense, vectors[len(self._examples) :], history or [])
        return Analysis(query, about, intent)

    async def _example_vectors(self) -> list[list[float]]:
        """Assistant-question examples, then intent examples, embedded on first use.

        Not at init: the Embedder may still be starting when this replica starts.
        """
        intent_examples = [text for _, text in self._intents.examples] if self._intents else []
        if self._vectors is None and (self._examples or intent_examples):
            self._vectors = [e.dense for e in await self._embedder.embed(self._examples + intent_examples)]
        return self._vectors or []
