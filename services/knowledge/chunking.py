"""Cutting documents into token-bounded chunks with stable ids and content hashes.

A document is cut by structure first: Markdown headings open sections (a chunk never
spans two sections and starts with its section's heading path), blank lines separate
paragraphs, and paragraphs are kept whole where they fit. Longer paragraphs are cut at
sentence ends, Chinese (。！？；) as well as Western (. ! ? ;), and a sentence longer than
a chunk is cut hard near a space. Sizes are counted with the embedder's own tokenizer, so
a chunk never overflows what the embedding model reads (MiniLM stops at 256 tokens,
BGE-M3 at 8192). When a paragraph continues into the next chunk, that chunk repeats the
previous one's last sentences (up to ``overlap_tokens``) so no sentence loses its
context; at paragraph ends nothing is repeated, a paragraph being a unit of its own.

Token counts are asked for in large batches over all documents of a run, because the
counter may be a remote call to the Embedder deployment.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from services.config import ChunkingConfig
from services.knowledge.documents import KnowledgeDocument
from services.schemas import KnowledgeChunk

TokenCounter = Callable[[list[str]], list[int]]
"""Counts the tokens of each text (no special tokens), as the embedder's tokenizer does."""

COUNT_BATCH = 2048
"""Texts per token-counting call."""

# Room for the newlines joining title, heading and body, which tokenizers may count.
_JOINER_TOKENS = 2
_MIN_BODY_TOKENS = 16

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# A sentence ends after CJK or Western end punctuation (with closing quotes or brackets),
# after a full stop followed by a space (not in "3.5" or "example.com"), or at a line break.
_SENTENCE_END = re.compile(r"(?:[。！？!?；;]+[”’」』）)\]\"']*|\.(?=\s)|\n)[ \t\u3000]*\n?")


def chunk_id(tenant: str, source: str, doc_id: str, chunk_no: int, digest: str) -> str:
    """Stable id of one version of a chunk.

    The content hash is part of the id: a changed chunk is a new row, written next to the
    old one until the run commits (see :mod:`services.knowledge.store`).
    """
    return f"{tenant}:{source}:{doc_id}:{chunk_no}:{digest[:16]}"


def content_hash(title: str, text: str) -> str:
    """Hash of what gets embedded, to skip re-embedding unchanged chunks."""
    return hashlib.sha256(f"{title}\n{text}".encode()).hexdigest()


@dataclass
class _Sentence:
    text: str  # with its trailing whitespace, so joining restores the original
    tokens: int = 0


@dataclass
class _Section:
    heading: str  # heading path, "" before the first heading
    heading_tokens: int = 0
    paragraphs: list[list[_Sentence]] = field(default_factory=list)


@dataclass
class _Document:
    source: KnowledgeDocument
    title_tokens: int = 0
    sections: list[_Section] = field(default_factory=list)


def normalize_text(text: str) -> str:
    """Unify line ends, drop trailing spaces and collapse runs of blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph at sentence ends; concatenating the pieces gives the paragraph back."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        if match.end() > start:
            pieces.append(paragraph[start : match.end()])
            start = match.end()
    if start < len(paragraph):
        pieces.append(paragraph[start:])
    return [p for p in pieces if p.strip()]


def _sections(doc: KnowledgeDocument) -> list[_Section]:
    path: list[tuple[int, str]] = []
    sections = [_Section(heading="")]
    block: list[str] = []

    def close_block() -> None:
        text = "\n".join(block).strip()
        if text:
            sections[-1].paragraphs.append([_Sentence(s) for s in split_sentences(text)])
        block.clear()

    for line in normalize_text(doc.text).split("\n"):
        heading = _HEADING.match(line)
        if heading is None:
            if line.strip():
                block.append(line)
            else:
                close_block()
            continue
        close_block()
        level, name = len(heading.group(1)), heading.group(2)
        path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, name)]
        # A top heading that repeats the title (Markdown files) adds nothing to each chunk.
        names = [h for _, h in path if h != doc.title]
        sections.append(_Section(heading=" / ".join(names)))
    close_block()
    return [s for s in sections if s.paragraphs]


def _hard_split(text: str, pieces: int) -> list[str]:
    """Cut text into about ``pieces`` parts of equal length, moving each cut to a nearby space."""
    size = math.ceil(len(text) / pieces)
    parts, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            space = text.rfind(" ", start + size // 2, end)
            end = space + 1 if space > 0 else end
        parts.append(text[start:end])
        start = end
    return parts


def _count_all(counter: TokenCounter, texts: list[str]) -> list[int]:
    counts: list[int] = []
    for start in range(0, len(texts), COUNT_BATCH):
        counts.extend(counter(texts[start : start + COUNT_BATCH]))
    return counts


def _budget(doc: _Document, section: _Section, max_tokens: int) -> int:
    return max(_MIN_BODY_TOKENS, max_tokens - doc.title_tokens - section.heading_tokens - _JOINER_TOKENS)


def _measure(docs: list[_Document], counter: TokenCounter, max_tokens: int) -> None:
    """Count every title, heading and sentence; cut sentences that exceed their chunk budget."""
    units: list[tuple[object, str]] = []
    for doc in docs:
        units.append((doc, doc.source.title))
        for section in doc.sections:
            if section.heading:
                units.append((section, section.heading))
            units.extend((s, s.text) for p in section.paragraphs for s in p)
    for (unit, _), count in zip(units, _count_all(counter, [t for _, t in units]), strict=True):
        if isinstance(unit, _Document):
            unit.title_tokens = count
        elif isinstance(unit, _Section):
            unit.heading_tokens = count
        elif isinstance(unit, _Sentence):
            unit.tokens = count
    # Over-long sentences are cut and re-counted until every piece fits; tokenizers do not
    # split text proportionally, so one round may not be enough.
    for _ in range(8):
        oversized = [
            (paragraph, i, budget)
            for doc in docs
            for section in doc.sections
            for budget in [_budget(doc, section, max_tokens)]
            for paragraph in section.paragraphs
            for i, s in enumerate(paragraph)
            if s.tokens > budget and len(s.text) > 1
        ]
        if not oversized:
            return
        replacements = []
        for paragraph, i, budget in oversized:
            sentence = paragraph[i]
            cut = _hard_split(sentence.text, math.ceil(sentence.tokens * 1.1 / budget))
            replacements.append((paragraph, i, [_Sentence(p) for p in cut if p]))
        new = [s for _, _, pieces in replacements for s in pieces]
        for sentence, count in zip(new, _count_all(counter, [s.text for s in new]), strict=True):
            sentence.tokens = count
        # Replace from the back so earlier indexes stay valid.
        for paragraph, i, pieces in reversed(replacements):
            paragraph[i : i + 1] = pieces


def _pack(section: _Section, budget: int, overlap: int) -> Iterator[str]:
    """Greedy packing of whole paragraphs, then sentences, into chunks of at most ``budget`` tokens."""
    current: list[tuple[int, _Sentence]] = []
    used = 0

    def render(items: list[tuple[int, _Sentence]]) -> str:
        paragraphs: dict[int, str] = {}
        for index, sentence in items:
            paragraphs[index] = paragraphs.get(index, "") + sentence.text
        body = "\n\n".join(p.strip() for p in paragraphs.values())
        return f"{section.heading}\n{body}" if section.heading else body

    for index, paragraph in enumerate(section.paragraphs):
        size = sum(s.tokens for s in paragraph)
        # Start a paragraph that does not fit on a fresh chunk rather than split it, unless
        # the current chunk is still less than half full.
        if current and used + size > budget and used >= budget // 2:
            yield render(current)
            current, used = [], 0
        for sentence in paragraph:
            if current and used + sentence.tokens > budget:
                yield render(current)
                carried: list[tuple[int, _Sentence]] = []
                if current[-1][0] == index:  # the paragraph continues: repeat its tail
                    for item in reversed(current):
                        if item[0] != index or sum(s.tokens for _, s in carried) + item[1].tokens > overlap:
                            break
                        carried.insert(0, item)
                    if sum(s.tokens for _, s in carried) + sentence.tokens > budget:
                        carried = []
                current, used = carried, sum(s.tokens for _, s in carried)
            current.append((index, sentence))
            used += sentence.tokens
    if current:
        yield render(current)


def chunk_documents(
    tenant: str,
    source: str,
    documents: list[KnowledgeDocument],
    count_tokens: TokenCounter,
    config: ChunkingConfig,
) -> list[KnowledgeChunk]:
    """Cut documents into chunks ready to embed and store, in document order."""
    docs = [_Document(source=d, sections=_sections(d)) for d in documents]
    _measure(docs, count_tokens, config.max_tokens)
    chunks: list[KnowledgeChunk] = []
    for doc in docs:
        d = doc.source
        texts = [
            text
            for section in doc.sections
            for text in _pack(section, _budget(doc, section, config.max_tokens), config.overlap_tokens)
        ]
        for n, text in enumerate(texts):
            digest = content_hash(d.title, text)
            chunks.append(
                KnowledgeChunk(
                    id=chunk_id(tenant, source, d.doc_id, n, digest),
                    tenant=tenant,
                    source=source,
                    doc_id=d.doc_id,
                    chunk_no=n,
                    title=d.title,
                    text=text,
                    category=d.category,
                    updated_at=d.updated_at,
                    content_hash=digest,
                )
            )
    return chunks
