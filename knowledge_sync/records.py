"""From raw source records to validated knowledge documents, deletions and rejects.

Every connector yields plain dicts; this module maps their fields (dotted paths into
nested JSON), recognizes tombstones, turns HTML into text, validates the result, and
tracks the updated-since cursor. A record that fails becomes a :class:`Reject` with the
reason and the run goes on.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from html.parser import HTMLParser
from typing import Any

from pydantic import BaseModel, ValidationError

from knowledge_sync.sources import FieldMap, SourceConfig
from services.knowledge.chunking import normalize_text
from services.knowledge.documents import KnowledgeDocument, validation_message
from services.knowledge.ingest import SourceBatch

_MISSING = object()


class Reject(BaseModel):
    """A record that was not synced, and why."""

    tenant: str
    source: str
    record: int
    doc_id: str | None = None
    reason: str


def lookup(record: Any, path: str) -> Any:
    """Value at a dotted path (``a.b.0.c``) in nested dicts and lists; ``_MISSING`` if absent."""
    value = record
    for key in path.split(".") if path else []:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return _MISSING
    return value


def cursor_key(value: Any) -> tuple[int, Any]:
    """Sort key of an updated-since value: datetimes and epochs by time, other text lexically."""
    if isinstance(value, datetime):
        return (0, (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
    if isinstance(value, date):
        return (0, datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp())
    if isinstance(value, int | float):
        return (0, float(value))
    if isinstance(value, str):
        try:
            return cursor_key(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        except ValueError:
            return (0, float(value)) if value.strip().isdigit() else (1, value)
    return (2, str(value))


class _TextOfHtml(HTMLParser):
    _BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")
            if tag[0] == "h" and tag[1:].isdigit():
                self.parts.append("#" * int(tag[1:]) + " ")  # keep headings as sections
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Text of an HTML fragment: blocks become paragraphs, headings Markdown headings."""
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    lines = ("".join(parser.parts)).split("\n")
    return "\n".join(" ".join(line.split()) for line in lines)


class RecordMapper:
    """Collects one pull's records into a :class:`SourceBatch` and a list of rejects."""

    def __init__(self, tenant: str, source: SourceConfig, *, cursor_path: str | None) -> None:
        self._tenant = tenant
        self._source = source
        self._fields: FieldMap = source.fields
        self._cursor_path = cursor_path
        self.documents: dict[str, KnowledgeDocument] = {}
        self.deleted: set[str] = set()
        self.rejects: list[Reject] = []
        self.records = 0
        self.cursor: Any = None

    def add(self, record: Any) -> None:
        """Map, validate and keep one record (or its reject)."""
        self.records += 1
        number = self.records
        if not isinstance(record, dict):
            self._reject(number, None, f"expected an object, got {type(record).__name__}")
            return
        if self._cursor_path is not None:
            self._advance_cursor(lookup(record, self._cursor_path))
        raw_id = lookup(record, self._fields.doc_id)
        doc_id = None if raw_id is _MISSING or raw_id is None else str(raw_id).strip()
        rule = self._source.deleted
        if rule is not None and lookup(record, rule.path) in rule.values:
            if doc_id:
                self.deleted.add(doc_id)
                self.documents.pop(doc_id, None)
            else:
                self._reject(number, None, f"deleted record without {self._fields.doc_id}")
            return
        if doc_id in self.documents:
            self._reject(number, doc_id, "doc_id appears more than once in this pull")
            return
        mapped = {
            field: value
            for field, path in self._fields.model_dump().items()
            if path is not None and (value := lookup(record, path)) is not _MISSING
        }
        if isinstance(mapped.get("doc_id"), int | float):
            mapped["doc_id"] = str(mapped["doc_id"])
        text = mapped.get("text")
        if isinstance(text, str):
            mapped["text"] = normalize_text(html_to_text(text) if self._source.text_format == "html" else text)
        try:
            document = KnowledgeDocument.model_validate(mapped)
        except ValidationError as err:
            self._reject(number, doc_id, validation_message(err))
            return
        self.deleted.discard(document.doc_id)
        self.documents[document.doc_id] = document

    def _advance_cursor(self, value: Any) -> None:
        if value is _MISSING or value is None or value == "":
            return
        if self.cursor is None or cursor_key(value) > cursor_key(self.cursor):
            self.cursor = value

    def _reject(self, number: int, doc_id: str | None, reason: str) -> None:
        self.rejects.append(
            Reject(tenant=self._tenant, source=self._source.name, record=number, doc_id=doc_id, reason=reason)
        )

    def batch(self, *, complete: bool) -> SourceBatch:
        """The pull as a batch for the pipeline; rejected records keep their stored versions."""
        cursor, is_datetime = self.cursor, isinstance(self.cursor, datetime | date)
        if is_datetime:
            cursor = cursor.isoformat()
        return SourceBatch(
            complete=complete,
            documents=list(self.documents.values()),
            deleted_doc_ids=sorted(self.deleted),
            kept_doc_ids=sorted({r.doc_id for r in self.rejects if r.doc_id and r.doc_id not in self.documents}),
            cursor=cursor,
            cursor_is_datetime=is_datetime,
            rejected=len(self.rejects),
        )
