"""The dialogue logic of the orchestrator, free of Ray and HTTP so it unit-tests fast.

Decides whether the knowledge base can answer (relevance gate), builds the chat
messages (persona + knowledge + recent turns + question) and shapes the sources.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from services.schemas import ChatMessage, RetrievedChunk
from services.sessions import Turn

GROUNDING_RULES = (
    "Answer the customer using only the knowledge entries below. "
    "If they do not cover the question, say you are not sure and offer to connect a human agent; "
    "never invent policies, prices, dates or order details. "
    "Reply in the language the customer writes in, briefly and politely."
)


@dataclass(frozen=True)
class Grounding:
    """The knowledge an answer may use, and how sure we are that it applies."""

    chunks: list[RetrievedChunk]
    confidence: float
    margin: float | None = None
    """How far the best dense similarity led the median of the dense candidates; None: no dense candidates."""

    @property
    def is_empty(self) -> bool:
        """True when nothing relevant was retrieved: the fallback reply applies."""
        return not self.chunks


def ground(
    hits: list[RetrievedChunk],
    threshold: float,
    top_k: int,
    min_margin: float = 0.0,
    rerank_threshold: float | None = None,
    dense_candidates: list[float] | None = None,
) -> Grounding:
    """Keep the hits relevant enough to answer from.

    The fused RRF score only orders hits; it says nothing about relevance, because
    every query has a first hit. The dense cosine similarity is the calibrated
    signal, so it decides: a hit counts when its similarity reaches ``threshold``.
    Some embedders score all text alike (multilingual-e5-small: unrelated text 0.80-0.89),
    so how far the best hit stands out from the other candidates says more: with
    ``min_margin`` the knowledge base has nothing relevant unless the best similarity leads
    the median of the dense signal's own candidates by that much. Not the median over the
    fused hits: which dense hits survive fusion depends on the other signals (a different
    BM25 tokenizer moved it). Hits reranked by a cross-encoder (``rerank_score``) are judged
    by it instead of the cosine: it reads the question and the passage together.

    Args:
        hits: Search hits, best first (reranked hits: best cross-encoder score first).
        threshold: Least dense similarity of a usable hit (hits not reranked).
        top_k: Most hits to keep.
        min_margin: Least lead of the best similarity over the candidates' median (0: no check).
        rerank_threshold: Least cross-encoder score of a usable hit, when the hits were reranked.
        dense_candidates: The dense signal's own similarities before fusion (``SearchResult``);
            None: the dense scores of ``hits``.

    Returns:
        The usable hits (best first) and the confidence, the best deciding score (0 if none).

    """
    if dense_candidates is None:
        dense_candidates = [h.dense_score for h in hits if h.dense_score is not None]
    dense = sorted(dense_candidates, reverse=True)
    margin = round(dense[0] - statistics.median(dense), 4) if dense else None
    if min_margin and margin is not None and margin < min_margin:
        return Grounding(chunks=[], confidence=0.0, margin=margin)

    def usable(hit: RetrievedChunk) -> bool:
        if hit.rerank_score is not None and rerank_threshold is not None:
            return hit.rerank_score >= rerank_threshold
        return hit.dense_score is not None and hit.dense_score >= threshold

    relevant = [h for h in hits if usable(h)][:top_k]
    confidence = max((relevance_of(h) or 0.0 for h in relevant), default=0.0)
    return Grounding(chunks=relevant, confidence=round(min(max(confidence, 0.0), 1.0), 4), margin=margin)


def relevance_of(hit: RetrievedChunk) -> float | None:
    """The score that judges a hit: the cross-encoder's when it was reranked, else the dense cosine."""
    return hit.rerank_score if hit.rerank_score is not None else hit.dense_score


def passage_of(hit: RetrievedChunk) -> str:
    """A hit as the model and the cross-encoder read it: its title, then its text."""
    return f"{hit.chunk.title}\n{hit.chunk.text}"


def build_messages(persona: str, grounding: Grounding, history: list[Turn], question: str) -> list[ChatMessage]:
    """Build the chat-template messages for one answer.

    Args:
        persona: The tenant's system prompt.
        grounding: Knowledge entries to answer from.
        history: Earlier turns, oldest first (already cut to the configured length).
        question: The shopper's new message.

    Returns:
        System message (persona, rules, numbered knowledge), the turns, then the question.

    """
    knowledge = "\n\n".join(f"[{n}] {passage_of(hit)}" for n, hit in enumerate(grounding.chunks, start=1))
    system = f"{persona.strip()}\n\n{GROUNDING_RULES}\n\nKnowledge entries:\n{knowledge}"
    if (language := written_in(question)) is not None:
        # Said last, where small models heed it: with a persona and entries in another
        # language, the 0.5B dev model otherwise answers a Chinese question in English.
        system += f"\n\nThe customer writes in {language}: write your whole reply in {language}."
    messages = [ChatMessage(role="system", content=system)]
    for turn in history:
        messages.append(ChatMessage(role="user", content=turn.user))
        messages.append(ChatMessage(role="assistant", content=turn.assistant))
    messages.append(ChatMessage(role="user", content=question))
    return messages


HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
"""One Han character (CJK unified ideographs, extension A, compatibility)."""
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")


def written_in(text: str) -> str | None:
    """The language of a shopper's message when it is clearly Chinese or English, else None.

    Order numbers and product names in Latin letters are common in Chinese messages
    ("我的订单LH-1001到哪了"), so any run of Han characters outweighs a few Latin words.
    """
    han = len(HAN.findall(text))
    latin = len(LATIN_WORD.findall(text))
    if han >= 2 and han >= latin:
        return "Chinese"
    if latin >= 2 and han == 0:
        return "English"
    return None


def sources_of(grounding: Grounding) -> list[dict[str, str | float]]:
    """One source per document (its best chunk), best first."""
    best: dict[str, dict[str, str | float]] = {}
    for hit in grounding.chunks:
        score = round(relevance_of(hit) or 0.0, 4)
        doc = hit.chunk.doc_id
        if doc not in best or score > float(best[doc]["score"]):
            best[doc] = {"doc_id": doc, "title": hit.chunk.title, "score": score}
    return sorted(best.values(), key=lambda s: float(s["score"]), reverse=True)
