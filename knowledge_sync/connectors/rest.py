"""REST source: a CRM/ERP HTTP API that lists records as JSON, page by page.

Requests are retried with exponential backoff on timeouts, connection errors, 429 and
5xx (tenacity); 401 and 403 fail at once with a message that names the credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from knowledge_sync.connectors import SourceAuthError, SourceError
from knowledge_sync.records import lookup
from knowledge_sync.sources import (
    ApiKeyAuth,
    BearerAuth,
    CursorPagination,
    OffsetPagination,
    PagePagination,
    RestSource,
    secret_from_env,
)

logger = logging.getLogger(__name__)


class _Transient(Exception):
    """A failure worth another try."""


class RestConnector:
    """Pulls records from a paginated JSON API."""

    def __init__(self, config: RestSource, *, transport: httpx.BaseTransport | None = None) -> None:
        self._config = config
        self.incremental = config.updated_since_param is not None
        self.cursor_path = config.fields.updated_at if self.incremental else None
        headers = dict(config.headers)
        auth = config.auth
        if isinstance(auth, BearerAuth):
            headers["Authorization"] = f"Bearer {secret_from_env(auth.token_env, f'source {config.name}')}"
        elif isinstance(auth, ApiKeyAuth):
            headers[auth.header] = secret_from_env(auth.key_env, f"source {config.name}")
        self._headers = headers
        self._transport = transport
        self._client: httpx.Client | None = None

    def pull(self, since: Any | None) -> Iterator[dict[str, Any]]:
        """Yield every record of every page (changed since ``since`` when given)."""
        config = self._config
        params: dict[str, Any] = dict(config.params)
        if since is not None and config.updated_since_param:
            params[config.updated_since_param] = since
        paging = config.pagination
        page = paging.first_page if isinstance(paging, PagePagination) else 0
        offset = 0
        with httpx.Client(headers=self._headers, timeout=config.timeout_s, transport=self._transport) as client:
            self._client = client
            for _ in range(config.max_pages):
                if isinstance(paging, PagePagination):
                    params[paging.page_param] = page
                    if paging.size_param:
                        params[paging.size_param] = paging.page_size
                elif isinstance(paging, OffsetPagination):
                    params[paging.offset_param], params[paging.limit_param] = offset, paging.limit
                body = self._get(params)
                records = lookup(body, config.records_path)
                if not isinstance(records, list):
                    where = f"at {config.records_path!r}" if config.records_path else "as the response body"
                    raise SourceError(f"source {config.name}: expected a list of records {where}")
                yield from records
                if paging is None or not records:
                    return
                if isinstance(paging, PagePagination):
                    if len(records) < paging.page_size:
                        return
                    page += 1
                elif isinstance(paging, OffsetPagination):
                    if len(records) < paging.limit:
                        return
                    offset += len(records)
                elif isinstance(paging, CursorPagination):
                    token = lookup(body, paging.next_cursor_path)
                    if not isinstance(token, str | int) or token == "":
                        return
                    params[paging.cursor_param] = token
            raise SourceError(f"source {config.name}: more than {config.max_pages} pages; is the pagination set right?")

    def _get(self, params: dict[str, Any]) -> Any:
        config = self._config
        retrying = Retrying(
            stop=stop_after_attempt(config.max_attempts),
            wait=wait_exponential(multiplier=config.backoff_s, max=30),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
            before_sleep=lambda state: logger.warning(
                "source %s: try %d failed (%s), retrying",
                config.name,
                state.attempt_number,
                state.outcome.exception() if state.outcome else None,
            ),
        )
        try:
            return retrying(self._get_once, params)
        except _Transient as err:
            raise SourceError(f"source {config.name}: {err} (after {config.max_attempts} tries)") from err

    def _get_once(self, params: dict[str, Any]) -> Any:
        name, url = self._config.name, self._config.url
        assert self._client is not None, "called outside pull()"
        try:
            reply = self._client.get(url, params=params)
        except httpx.TransportError as err:  # timeouts, refused connections, resets
            raise _Transient(f"{url} unreachable: {type(err).__name__}: {err}") from err
        if reply.status_code in (401, 403):
            raise SourceAuthError(
                f"source {name}: {url} refused the credentials ({reply.status_code}); check the auth settings "
                "and the secret they name"
            )
        if reply.status_code == 429 or reply.status_code >= 500:
            raise _Transient(f"{url} answered {reply.status_code}")
        if reply.status_code >= 400:
            raise SourceError(f"source {name}: {url} answered {reply.status_code}: {reply.text[:300]}")
        try:
            return reply.json()
        except ValueError as err:
            raise SourceError(f"source {name}: {url} did not answer JSON: {reply.text[:200]!r}") from err
