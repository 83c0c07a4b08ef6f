"""Connectors: pull raw records out of a source system.

A connector yields plain dicts, one per record; :mod:`knowledge_sync.records` maps and
validates them. ``pull(since=None)`` reads everything (a complete pull);
``pull(since=cursor)`` reads records changed at or after the cursor where the source
supports it (``incremental`` is True).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class SourceError(RuntimeError):
    """A source system failed or refused; the run of that source changes nothing."""


class SourceAuthError(SourceError):
    """The source refused our credentials (401/403): retrying will not help."""


class Connector(Protocol):
    """What the sync runner needs from a source system."""

    incremental: bool
    """Whether ``pull(since=...)`` returns only changed records."""

    cursor_path: str | None
    """Field of a record whose largest value is the next ``since``; None when not incremental."""

    def pull(self, since: Any | None) -> Iterator[dict[str, Any]]:
        """Yield raw records: all of them, or those changed since ``since``."""
        ...
