"""Loading knowledge files and chunking them with stable ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowledge_sync.chunking import chunk_document, chunk_id, split_text
from knowledge_sync.documents import DocumentLoadError, KnowledgeDocument, load_documents
from tests.conftest import SAMPLE_KB


def test_sample_kb_is_bilingual_and_large_enough() -> None:
    docs = load_documents(SAMPLE_KB)
    assert len(docs) >= 30
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in d.text) for d in docs)
    assert any(d.doc_id.endswith("-en") for d in docs)


def test_chunk_ids_are_stable_and_distinct() -> None:
    doc = KnowledgeDocument(doc_id="returns", title="Returns", text="Para one.\n\nPara two." * 50)
    first = chunk_document("lumen", "crm", doc, max_chars=200)
    second = chunk_document("lumen", "crm", doc, max_chars=200)
    assert [c.id for c in first] == [c.id for c in second]
    assert len({c.id for c in first}) == len(first) > 1
    assert first[0].id == chunk_id("lumen", "crm", "returns", 0) == "lumen:crm:returns:0"
    assert chunk_document("other", "crm", doc, max_chars=200)[0].id != first[0].id


def test_content_hash_changes_with_text_only() -> None:
    a = chunk_document("t", "s", KnowledgeDocument(doc_id="d", title="T", text="same"))[0]
    b = chunk_document("t", "s", KnowledgeDocument(doc_id="d", title="T", text="same", category="x"))[0]
    c = chunk_document("t", "s", KnowledgeDocument(doc_id="d", title="T", text="changed"))[0]
    assert a.content_hash == b.content_hash != c.content_hash


def test_split_respects_limit_and_cjk_sentences() -> None:
    text = "退货需在七天内申请。" * 30 + "\n\n" + "Short paragraph."
    pieces = split_text(text, max_chars=50)
    assert all(len(p) <= 50 for p in pieces)
    assert pieces[0].endswith("。")
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


def test_csv_and_markdown_load(tmp_path: Path) -> None:
    (tmp_path / "faq.csv").write_text("doc_id,title,text,updated_at\nq1,Hours,We open at 9.,2026-01-02\n")
    (tmp_path / "sop.md").write_text("# Handling refunds\n\nCheck the order first.\n")
    docs = {d.doc_id: d for d in load_documents(tmp_path)}
    assert docs["q1"].updated_at == 1767312000
    assert docs["sop"].title == "Handling refunds"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.json", "{not json", "not readable JSON"),
        ("bad.json", '[{"doc_id": "a", "title": "t"}]', "record 1: text: Field required"),
        ("bad.csv", "id,title\n1,x\n", "CSV header lacks doc_id, text"),
        ("dup.json", '[{"doc_id":"a","title":"t","text":"x"},{"doc_id":"a","title":"t","text":"y"}]', "more than once"),
        ("bad.txt", "hello", "unsupported format"),
    ],
)
def test_bad_files_are_named_with_the_fault(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DocumentLoadError, match=expected):
        load_documents(path)
