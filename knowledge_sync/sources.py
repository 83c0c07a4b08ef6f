"""The sources file: which systems feed each tenant's knowledge base, declared in YAML.

Example::

    tenants:
      lumen:
        chunking: {max_tokens: 384, overlap_tokens: 48}
        sources:
          - name: crm-policies
            type: rest
            url: https://crm.example.com/api/v2/policies
            auth: {type: bearer, token_env: CRM_TOKEN}
            pagination: {style: cursor, cursor_param: cursor, next_cursor_path: meta.next}
            records_path: data
            updated_since_param: updated_since
            fields: {doc_id: id, title: name, text: body, updated_at: modified}
            deleted: {path: status, values: [archived]}
          - name: erp-rules
            type: sql
            url_env: ERP_DATABASE_URL
            query: SELECT id AS doc_id, title, body AS text, updated_at FROM policies
            watermark_column: updated_at
          - name: policy-files
            type: files
            path: policies/

Secrets never sit in the file: it names the environment variables that hold them
(a Kubernetes Secret mounted as environment in production).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.config import SOURCE_PATTERN, TENANT_PATTERN, ChunkingConfig

_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourcesFileError(ValueError):
    """The sources file is missing, unreadable or invalid; the message names the fault."""


def secret_from_env(variable: str, what: str) -> str:
    """Read a secret from the environment.

    Raises:
        SourcesFileError: the variable is unset or empty.

    """
    value = os.environ.get(variable, "")
    if not value:
        raise SourcesFileError(f"{what}: environment variable {variable} is not set")
    return value


class FieldMap(_Strict):
    """Where each document field is in a source record (dotted paths into nested JSON)."""

    doc_id: str = "doc_id"
    title: str = "title"
    text: str = "text"
    category: str | None = "category"
    updated_at: str | None = Field("updated_at", description="Also the updated-since cursor of REST sources.")


class DeletedRule(_Strict):
    """Tombstones: records whose field at ``path`` has one of ``values`` are deletions."""

    path: str
    values: list[Any] = Field(min_length=1)


class _SourceBase(_Strict):
    name: str = Field(pattern=SOURCE_PATTERN, description="Source name; part of every chunk id.")
    fields: FieldMap = Field(default_factory=FieldMap)
    deleted: DeletedRule | None = Field(None, description="How the source marks deleted records.")
    text_format: Literal["plain", "markdown", "html"] = Field("markdown", description="html is turned into text.")
    full_sync_every_hours: float = Field(
        24, gt=0, description="Incremental sources also pull everything this often, to find hard deletions."
    )
    max_delete_fraction: float = Field(
        0.5, gt=0, le=1, description="A complete pull that would delete more of the source's documents fails."
    )


class BearerAuth(_Strict):
    """``Authorization: Bearer <token>``."""

    type: Literal["bearer"]
    token_env: str = Field(description="Environment variable holding the token.")


class ApiKeyAuth(_Strict):
    """An API key in a request header."""

    type: Literal["api_key"]
    header: str = "X-API-Key"
    key_env: str = Field(description="Environment variable holding the key.")


class PagePagination(_Strict):
    """``?page=N&page_size=M``; stops at a short or empty page."""

    style: Literal["page"]
    page_param: str = "page"
    size_param: str | None = "page_size"
    page_size: int = Field(100, ge=1)
    first_page: int = Field(1, ge=0)


class OffsetPagination(_Strict):
    """``?offset=N&limit=M``; stops at a short or empty page."""

    style: Literal["offset"]
    offset_param: str = "offset"
    limit_param: str = "limit"
    limit: int = Field(100, ge=1)


class CursorPagination(_Strict):
    """``?cursor=<token>`` with the next token in the response; stops when it is empty."""

    style: Literal["cursor"]
    cursor_param: str = "cursor"
    next_cursor_path: str = Field("next_cursor", description="Dotted path of the next cursor in the response.")


class RestSource(_SourceBase):
    """A CRM/ERP HTTP API returning JSON records."""

    type: Literal["rest"]
    url: str = Field(pattern=r"^https?://", description="Endpoint listing the records.")
    params: dict[str, str] = Field(default_factory=dict, description="Fixed query parameters.")
    headers: dict[str, str] = Field(default_factory=dict, description="Fixed headers (no secrets: use auth).")
    auth: Annotated[BearerAuth | ApiKeyAuth, Field(discriminator="type")] | None = None
    pagination: Annotated[PagePagination | OffsetPagination | CursorPagination, Field(discriminator="style")] | None = (
        None
    )
    records_path: str = Field("", description="Dotted path of the record list in a response; '' for a bare list.")
    updated_since_param: str | None = Field(None, description="Query parameter for incremental pulls.")
    timeout_s: float = Field(30, gt=0)
    max_attempts: int = Field(5, ge=1, le=20, description="Tries per request on 5xx, 429 and timeouts.")
    backoff_s: float = Field(1.0, ge=0, description="First wait between tries; doubles up to 30 s.")
    max_pages: int = Field(100_000, ge=1, description="Guard against a pagination loop.")


class SqlSource(_SourceBase):
    """A SQL database through SQLAlchemy: a query plus a watermark column."""

    type: Literal["sql"]
    url: str | None = Field(None, description="SQLAlchemy URL without a password (e.g. sqlite:///erp.db).")
    url_env: str | None = Field(None, description="Environment variable holding the URL (with credentials).")
    query: str = Field(min_length=1, description="A SELECT returning one row per record.")
    watermark_column: str | None = Field(
        None, pattern=_IDENTIFIER, description="Column of the query ordering changes; enables incremental pulls."
    )
    fetch_size: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _one_url(self) -> SqlSource:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        return self

    def database_url(self) -> str:
        """The SQLAlchemy URL, read from the environment when ``url_env`` names it."""
        return self.url or secret_from_env(str(self.url_env), f"source {self.name}")


class FilesSource(_SourceBase):
    """A JSON, CSV or Markdown file, or a folder of them (relative to the sources file)."""

    type: Literal["files"]
    path: Path


SourceConfig = Annotated[RestSource | SqlSource | FilesSource, Field(discriminator="type")]


class TenantSources(_Strict):
    """One tenant's sources and chunking."""

    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    sources: list[SourceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> TenantSources:
        names = [s.name for s in self.sources]
        if len(names) != len(set(names)):
            raise ValueError(f"source names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        return self


class SourcesFile(_Strict):
    """The whole file: tenants by id."""

    tenants: dict[Annotated[str, Field(pattern=TENANT_PATTERN)], TenantSources] = Field(min_length=1)


def load_sources(path: Path) -> SourcesFile:
    """Read and validate a sources file; relative file paths become relative to its folder.

    Raises:
        SourcesFileError: the file is missing, not YAML, or invalid (the message names the field).

    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SourcesFileError(f"{path}: cannot read the sources file: {err}") from err
    try:
        sources = SourcesFile.model_validate(data)
    except ValidationError as err:
        faults = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5])
        raise SourcesFileError(f"{path}: {faults}") from err
    base = path.parent
    for tenant in sources.tenants.values():
        for i, source in enumerate(tenant.sources):
            if isinstance(source, FilesSource) and not source.path.is_absolute():
                tenant.sources[i] = source.model_copy(update={"path": base / source.path})
    return sources
