"""Knowledge documents and the loaders of local JSON, CSV and Markdown files."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from services.knowledge.collections import FIELD_BYTES


class KnowledgeDocument(BaseModel):
    """One policy, FAQ entry or SOP as it comes from a source system."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    doc_id: str = Field(min_length=1, max_length=200, pattern=r"^[^\s:]+$", description="Stable id in the source.")
    title: str = Field(min_length=1, max_length=500)
    text: str = Field(min_length=1)
    category: str = Field("", max_length=100)
    # The schema states what the validator accepts: seconds, an ISO date or datetime, or nothing.
    updated_at: Annotated[
        int,
        WithJsonSchema(
            {
                "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}, {"type": "null"}],
                "description": "Unix seconds, or an ISO date or datetime; null or absent: unknown.",
            }
        ),
    ] = Field(0, ge=0)

    @field_validator("doc_id", "title", "category")
    @classmethod
    def _fits_the_store(cls, value: str, info: Any) -> str:
        # Checked per record, so one long Chinese title is one reject, not a failed source.
        size = len(value.encode("utf-8", "surrogatepass"))
        limit = FIELD_BYTES[info.field_name]
        if size > limit:
            raise ValueError(f"is {size} bytes in UTF-8; the store holds at most {limit} (a Chinese character is 3)")
        return value

    @field_validator("updated_at", mode="before")
    @classmethod
    def _to_epoch(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("a boolean is no time")
        if value in (None, ""):
            return 0
        if isinstance(value, str) and not value.strip().isdigit():
            value = datetime.fromisoformat(value.strip())
        if isinstance(value, datetime):
            return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
        if isinstance(value, date):
            return int(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp())
        return value


class DocumentLoadError(ValueError):
    """A knowledge file cannot be read; the message names the file and the fault."""


def record_files(path: Path) -> list[Path]:
    """The knowledge files at ``path``: the file itself, or the supported files of a folder.

    Raises:
        DocumentLoadError: no such path, unsupported format or an empty folder.

    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _READERS and p.is_file())
        if not files:
            raise DocumentLoadError(f"{path}: no .json, .csv or .md files in this folder")
        return files
    if not path.is_file():
        raise DocumentLoadError(f"{path}: no such file or folder")
    if path.suffix.lower() not in _READERS:
        raise DocumentLoadError(f"{path}: unsupported format (use .json, .csv or .md)")
    return [path]


def read_records(file: Path) -> list[dict[str, Any]]:
    """The raw records of one JSON, CSV or Markdown file, not yet validated.

    JSON: a list of objects, or an object with a ``documents`` list. CSV: a header row
    with ``doc_id,title,text`` (``category``, ``updated_at`` optional). Markdown: one
    document per file; the id is the file name, the title its first heading.

    Raises:
        DocumentLoadError: the file as a whole cannot be read.

    """
    return _READERS[file.suffix.lower()](file)


def load_documents(path: Path) -> list[KnowledgeDocument]:
    """Load and validate every document at ``path``, failing on the first bad record.

    Raises:
        DocumentLoadError: unreadable file, unknown format, invalid record or repeated id.

    """
    documents: list[KnowledgeDocument] = []
    for file in record_files(path):
        for n, record in enumerate(read_records(file), start=1):
            try:
                documents.append(KnowledgeDocument.model_validate(record))
            except ValidationError as err:
                raise DocumentLoadError(f"{file}: record {n}: {validation_message(err)}") from err
    seen: set[str] = set()
    for doc in documents:
        if doc.doc_id in seen:
            raise DocumentLoadError(f"{path}: doc_id {doc.doc_id!r} appears more than once")
        seen.add(doc.doc_id)
    return documents


def validation_message(err: ValidationError) -> str:
    """The first fault of a validation error as ``field: message``."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    return f"{where}: {str(first['msg']).removeprefix('Value error, ')}"


def _read_json(file: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DocumentLoadError(f"{file}: not readable JSON: {err}") from err
    records = data.get("documents") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DocumentLoadError(f"{file}: expected a list of documents or an object with a 'documents' list")
    return records


def _read_csv(file: Path) -> list[dict[str, Any]]:
    try:
        with file.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"doc_id", "title", "text"} - set(reader.fieldnames or [])
            if missing:
                raise DocumentLoadError(f"{file}: CSV header lacks {', '.join(sorted(missing))}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DocumentLoadError(f"{file}: not readable CSV: {err}") from err


_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _read_markdown(file: Path) -> list[dict[str, Any]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DocumentLoadError(f"{file}: not readable text: {err}") from err
    heading = _HEADING.search(text)
    return [
        {
            "doc_id": re.sub(r"[\s:]+", "-", file.stem),
            "title": heading.group(1) if heading else file.stem,
            "text": text,
            "updated_at": int(file.stat().st_mtime),
        }
    ]


_READERS = {".json": _read_json, ".csv": _read_csv, ".md": _read_markdown, ".markdown": _read_markdown}
