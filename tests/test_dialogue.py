"""Prompt building, the relevance gate and session memory."""

from __future__ import annotations

from services.chat.grounding import build_messages, ground, sources_of
from services.schemas import KnowledgeChunk, RetrievedChunk
from services.sessions import Turn


def hit(doc_id: str, dense: float | None, chunk_no: int = 0, fused: float = 0.01) -> RetrievedChunk:
    chunk = KnowledgeChunk(
        id=f"t:s:{doc_id}:{chunk_no}",
        tenant="t",
        source="s",
        doc_id=doc_id,
        chunk_no=chunk_no,
        title=f"Title {doc_id}",
        text=f"Text of {doc_id}",
        content_hash="h",
    )
    return RetrievedChunk(chunk=chunk, score=fused, dense_score=dense)


def test_gate_keeps_only_hits_above_threshold() -> None:
    grounding = ground([hit("a", 0.8), hit("b", 0.2), hit("c", 0.5)], threshold=0.45, top_k=5)
    assert [h.chunk.doc_id for h in grounding.chunks] == ["a", "c"]
    assert grounding.confidence == 0.8


def test_gate_empty_when_nothing_relevant() -> None:
    grounding = ground([hit("a", 0.3), hit("b", None)], threshold=0.45, top_k=5)
    assert grounding.is_empty
    assert grounding.confidence == 0.0


def test_gate_ignores_bm25_only_hits() -> None:
    # A hit found only lexically has no dense score: it cannot vouch for relevance.
    assert ground([hit("a", None)], threshold=0.0, top_k=5).is_empty


def test_gate_respects_top_k() -> None:
    grounding = ground([hit(str(n), 0.9 - n / 100) for n in range(10)], threshold=0.1, top_k=3)
    assert len(grounding.chunks) == 3


def test_messages_hold_persona_knowledge_history_question_in_order() -> None:
    grounding = ground([hit("returns", 0.9)], threshold=0.5, top_k=3)
    history = [Turn(user="hi", assistant="hello"), Turn(user="q2", assistant="a2")]
    messages = build_messages("You are Lumen's assistant.", grounding, history, "How do returns work?")
    assert [m.role for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    system = messages[0].content
    assert system.startswith("You are Lumen's assistant.")
    assert "[1] Title returns\nText of returns" in system
    assert "never invent policies" in system
    assert messages[1].content == "hi" and messages[4].content == "a2"
    assert messages[-1].content == "How do returns work?"


def test_sources_one_per_document_best_chunk_first() -> None:
    grounding = ground([hit("a", 0.6, 0), hit("a", 0.9, 1), hit("b", 0.7)], threshold=0.5, top_k=5)
    assert sources_of(grounding) == [
        {"doc_id": "a", "title": "Title a", "score": 0.9},
        {"doc_id": "b", "title": "Title b", "score": 0.7},
    ]


def test_a_best_hit_that_does_not_stand_out_from_the_candidates_is_no_evidence() -> None:
    # e5-like scores: everything is similar; only a lead over the median tells relevance.
    flat = [hit("a", 0.86), hit("b", 0.85), hit("c", 0.845), hit("d", 0.84), hit("e", 0.835)]
    peaked = [hit("a", 0.90), hit("b", 0.85), hit("c", 0.845), hit("d", 0.84), hit("e", 0.835)]
    assert ground(flat, threshold=0.82, top_k=3, min_margin=0.03).is_empty
    kept = ground(peaked, threshold=0.82, top_k=3, min_margin=0.03)
    assert [h.chunk.doc_id for h in kept.chunks] == ["a", "b", "c"] and kept.confidence == 0.9
    assert [h.chunk.doc_id for h in ground(flat, threshold=0.82, top_k=3).chunks] == ["a", "b", "c"]  # off: kept


def test_the_margin_is_measured_against_the_dense_signals_own_candidates_not_the_fused_hits() -> None:
    # Fusion kept the dense signal's best three and lexical hits with no dense score; the
    # dense search's own 20 candidates trail far behind the best.
    fused = [hit("a", 0.90), hit("lexical-1", None), hit("b", 0.89), hit("lexical-2", None), hit("c", 0.88)]
    own = [0.90, 0.89, 0.88] + [0.84] * 17
    assert ground(fused, threshold=0.82, top_k=3, min_margin=0.03).is_empty  # median of 0.90, 0.89, 0.88
    kept = ground(fused, threshold=0.82, top_k=3, min_margin=0.03, dense_candidates=own)
    assert [h.chunk.doc_id for h in kept.chunks] == ["a", "b", "c"] and kept.margin == 0.06
    # And candidates that all score alike refuse, whatever survived fusion.
    flat_own = [0.90, 0.89, 0.88] + [0.885] * 17
    assert ground(fused, threshold=0.82, top_k=3, min_margin=0.03, dense_candidates=flat_own).is_empty


def test_reranked_hits_are_judged_by_the_cross_encoder_not_the_cosine() -> None:
    # A cross-encoder reads question and passage together: it can reject a hit the cosine
    # likes, and vouch for one found only lexically (no dense score).
    reranked = [
        hit("lexical", None).model_copy(update={"rerank_score": 0.9}),
        hit("close-but-wrong", 0.95).model_copy(update={"rerank_score": 0.02}),
    ]
    grounding = ground(reranked, threshold=0.5, top_k=5, rerank_threshold=0.3)
    assert [h.chunk.doc_id for h in grounding.chunks] == ["lexical"] and grounding.confidence == 0.9
    assert sources_of(grounding) == [{"doc_id": "lexical", "title": "Title lexical", "score": 0.9}]
    assert ground(reranked[1:], threshold=0.5, top_k=5, rerank_threshold=0.3).is_empty


def test_the_prompt_ends_by_naming_the_customers_language() -> None:
    from services.chat.grounding import written_in

    assert written_in("我的订单LH-1001现在到哪里了？") == "Chinese"
    assert written_in("退款多久到账？") == "Chinese"
    assert written_in("How long do refunds take?") == "English"
    assert written_in("LH-1001?") is None and written_in("👍") is None
    grounding = ground([hit("returns", 0.9)], threshold=0.5, top_k=3)
    system = build_messages("You are Lumen's assistant.", grounding, [], "可以开发票吗？")[0].content
    assert system.endswith("The customer writes in Chinese: write your whole reply in Chinese.")
