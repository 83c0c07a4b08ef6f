"""Files source: JSON, CSV and Markdown files, or a folder of them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from knowledge_sync.connectors import SourceError
from knowledge_sync.sources import FilesSource
from services.knowledge.documents import DocumentLoadError, read_records, record_files


class FilesConnector:
    """Reads every file on each pull; unchanged chunks cost only a hash comparison."""

    incremental = False
    cursor_path: str | None = None

    def __init__(self, config: FilesSource) -> None:
        self._config = config

    def pull(self, since: Any | None) -> Iterator[dict[str, Any]]:
        """Yield the records of every file, in path order.

        Raises:
            SourceError: a file cannot be read as a whole. Nothing of the source changes,
                so its documents are not deleted because their file was unreadable.

        """
        try:
            files = record_files(self._config.path)
            batches = [read_records(file) for file in files]  # read all before yielding any
        except DocumentLoadError as err:
            raise SourceError(str(err)) from err
        for records in batches:
            yield from records
