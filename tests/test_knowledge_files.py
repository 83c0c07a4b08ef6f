"""Loading knowledge files and chunking them with stable ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from cs_testing.knowledge import SAMPLE_KB
from services.knowledge.documents import DocumentLoadError, load_documents


def test_sample_kb_is_bilingual_and_large_enough() -> None:
    docs = load_documents(SAMPLE_KB)
    assert len(docs) >= 30
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in d.text) for d in docs)
    assert any(d.doc_id.endswith("-en") for d in docs)


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


def test_shipped_sources_files_are_valid() -> None:
    from knowledge_sync.sources import FilesSource, RestSource, SqlSource, load_sources

    samples = SAMPLE_KB.parent
    dev = load_sources(samples / "sources.dev.yaml")
    [files] = dev.tenants["lumen"].sources
    assert isinstance(files, FilesSource) and files.path == SAMPLE_KB  # relative to the sources file
    example = load_sources(samples / "sources.example.yaml")
    kinds = [type(s) for s in example.tenants["lumen"].sources]
    assert kinds == [RestSource, SqlSource, FilesSource]


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("tenants: {lumen: {sources: [{name: a, type: ftp}]}}", "does not match any of the expected tags"),
        ("tenants: {Lumen: {sources: [{name: a, type: files, path: x}]}}", "String should match pattern"),
        ("tenants: {lumen: {sources: [{name: a, type: sql, query: SELECT 1}]}}", "exactly one of url and url_env"),
        ("tenants: {lumen: {sources: [{name: a, type: files, path: x, colour: red}]}}", "Extra inputs"),
        (
            "tenants: {lumen: {sources: [{name: a, type: files, path: x}, {name: a, type: files, path: y}]}}",
            "source names repeat",
        ),
    ],
)
def test_bad_sources_files_name_the_fault(tmp_path: Path, content: str, fault: str) -> None:
    from knowledge_sync.sources import SourcesFileError, load_sources

    path = tmp_path / "sources.yaml"
    path.write_text(content)
    with pytest.raises(SourcesFileError, match=fault):
        load_sources(path)


def test_a_sources_state_keeps_the_last_runs_rejected_count() -> None:
    from services.knowledge.ingest import SourceBatch, _next_source_state
    from services.knowledge.store import SourceState

    state = _next_source_state(SourceState(rejected=5), SourceBatch(complete=True, rejected=2), documents=7)
    assert (state.documents, state.rejected) == (7, 2)
    assert _next_source_state(state, SourceBatch(complete=False), documents=7).rejected == 0  # a clean run
