"""Cutting documents into chunks with stable ids and content hashes.

A minimal chunker for the first version: paragraphs (and Markdown headings) are kept
whole where they fit; long ones are cut at sentence ends, Chinese (。！？) as well as
Western (. ! ?). Sizes are in characters, which is conservative for CJK text where a
character is about one token.
"""

from __future__ import annotations

import hashlib
import re

from knowledge_sync.documents import KnowledgeDocument
from services.schemas import KnowledgeChunk

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n|\n(?=#{1,6}\s)")
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|(?<=[.])\s+")


def chunk_id(tenant: str, source: str, doc_id: str, chunk_no: int) -> str:
    """Stable id of a chunk: the same document part always lands on the same row."""
    return f"{tenant}:{source}:{doc_id}:{chunk_no}"


def content_hash(title: str, text: str) -> str:
    """Hash of what gets embedded, to skip re-embedding unchanged chunks."""
    return hashlib.sha256(f"{title}\n{text}".encode()).hexdigest()


def split_text(text: str, max_chars: int) -> list[str]:
    """Split text into pieces of at most ``max_chars``, preferring paragraph then sentence ends."""
    pieces: list[str] = []
    for paragraph in (p.strip() for p in _PARAGRAPH_BREAK.split(text)):
        if not paragraph:
            continue
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for sentence in (s.strip() for s in _SENTENCE_END.split(paragraph)):
            # A sentence longer than the limit is cut hard; rare in policy text.
            pieces.extend(sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars) if sentence)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] = f"{chunks[-1]}\n{piece}"
        else:
            chunks.append(piece)
    return chunks


def chunk_document(tenant: str, source: str, doc: KnowledgeDocument, max_chars: int = 800) -> list[KnowledgeChunk]:
    """Cut one document into chunks ready to embed and store."""
    return [
        KnowledgeChunk(
            id=chunk_id(tenant, source, doc.doc_id, n),
            tenant=tenant,
            source=source,
            doc_id=doc.doc_id,
            chunk_no=n,
            title=doc.title,
            text=text,
            category=doc.category,
            updated_at=doc.updated_at,
            content_hash=content_hash(doc.title, text),
        )
        for n, text in enumerate(split_text(doc.text, max_chars))
    ]
