"""Token-bounded, structure-aware chunking with stable ids."""

from __future__ import annotations

import itertools
import re

import pytest

from services.config import ChunkingConfig
from services.knowledge.chunking import chunk_documents, normalize_text, split_sentences
from services.knowledge.documents import KnowledgeDocument

_TOKEN = re.compile(r"[\u4e00-\u9fff]|\w+|[^\w\s]")


def count(texts: list[str]) -> list[int]:
    """A stand-in tokenizer: one token per CJK character, word or punctuation mark."""
    return [len(_TOKEN.findall(t)) for t in texts]


def chunks(text: str, max_tokens: int = 64, overlap: int = 8, title: str = "T") -> list[str]:
    doc = KnowledgeDocument(doc_id="d", title=title, text=text)
    config = ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap)
    return [c.text for c in chunk_documents("t", "s", [doc], count, config)]


def test_every_chunk_fits_the_token_budget_with_its_title() -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "Returns are free within seven days. " * (i % 5 + 1) for i in range(30))
    text += "\n\n" + "退货需在签收后七天内申请，商品需保持完好。" * 40  # one long CJK paragraph
    title = "Returns and refunds"
    pieces = chunks(text, max_tokens=64, title=title)
    assert len(pieces) > 10
    assert max(count([f"{title}\n{p}"])[0] for p in pieces) <= 64


def test_a_sentence_longer_than_a_chunk_is_cut_hard() -> None:
    words = " ".join(f"w{i}" for i in range(300))  # no sentence end at all
    pieces = chunks(words, max_tokens=50, overlap=0)
    assert all(count([p])[0] <= 50 for p in pieces)
    assert " ".join(pieces).split() == words.split()


def test_paragraphs_that_fit_are_kept_whole_and_not_repeated() -> None:
    paragraphs = [f"Rule {i}: " + "items must be unused. " * 4 for i in range(6)]
    pieces = chunks("\n\n".join(paragraphs), max_tokens=48, overlap=8)
    for paragraph in paragraphs:
        assert sum(paragraph.strip() in p for p in pieces) == 1


def test_a_split_paragraph_carries_overlap_into_the_next_chunk() -> None:
    sentences = [f"第{i}条：退货商品须保持原包装。" for i in range(20)]
    pieces = chunks("".join(sentences), max_tokens=48, overlap=16)  # a sentence is 15 tokens
    assert len(pieces) > 2
    for first, second in itertools.pairwise(pieces):
        last_sentence = split_sentences(first)[-1]
        assert second.startswith(last_sentence)  # the tail is repeated
    assert all(s in "".join(pieces) for s in sentences)


def test_markdown_headings_open_sections_and_lead_their_chunks() -> None:
    text = "# Shipping\n\nIntro.\n\n## Costs\n\nFree over 99.\n\n## Times\n\nTwo days.\n\n# Returns\n\nSeven days."
    pieces = chunks(text, max_tokens=20, overlap=0, title="Shipping")
    assert pieces == ["Intro.", "Costs\nFree over 99.", "Times\nTwo days.", "Returns\nSeven days."]


def test_ids_are_stable_carry_the_content_hash_and_differ_per_tenant() -> None:
    doc = KnowledgeDocument(doc_id="returns", title="Returns", text="Para one.\n\nPara two. " * 50)
    config = ChunkingConfig(max_tokens=40, overlap_tokens=0)
    first = chunk_documents("lumen", "crm", [doc], count, config)
    assert [c.id for c in first] == [c.id for c in chunk_documents("lumen", "crm", [doc], count, config)]
    assert len({c.id for c in first}) == len(first) > 1
    assert first[0].id == f"lumen:crm:returns:0:{first[0].content_hash[:16]}"
    assert chunk_documents("other", "crm", [doc], count, config)[0].id != first[0].id
    edited = doc.model_copy(update={"text": doc.text.replace("Para one.", "Para 1.", 1)})
    changed = chunk_documents("lumen", "crm", [edited], count, config)
    assert changed[0].id != first[0].id and changed[-1].id == first[-1].id  # only the edited chunk moves


def test_sentence_split_keeps_cjk_and_western_ends_and_restores_the_text() -> None:
    paragraph = "退货需在七天内申请。运费由谁承担？Returns are free. Version 3.5 is current! Next line\nlast"
    pieces = split_sentences(paragraph)
    assert pieces[0] == "退货需在七天内申请。" and pieces[1] == "运费由谁承担？"
    assert "Version 3.5 is current! " in pieces
    assert "".join(pieces) == paragraph


def test_normalize_text_unifies_line_ends_and_blank_runs() -> None:
    assert normalize_text("a  \r\nb\r\n\r\n\r\n\nc ") == "a\nb\n\nc"


def test_overlap_must_be_under_half_the_chunk() -> None:
    with pytest.raises(ValueError, match="overlap_tokens must be less than half"):
        ChunkingConfig(max_tokens=64, overlap_tokens=32)
