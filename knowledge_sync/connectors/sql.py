"""SQL source: a query over an ERP database through SQLAlchemy, with a watermark column."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from knowledge_sync.connectors import SourceAuthError, SourceError
from knowledge_sync.sources import SqlSource


class SqlConnector:
    """Streams the rows of the configured query; incremental when a watermark column is set.

    An incremental pull wraps the query as ``SELECT * FROM (<query>) AS src WHERE
    src.<watermark> >= :since``: ``>=`` rather than ``>`` so rows written in the same
    instant as the last one seen are not missed; seeing a row twice costs nothing, its
    chunks are unchanged.
    """

    def __init__(self, config: SqlSource, *, cursor_is_datetime: bool = False) -> None:
        self._config = config
        self.incremental = config.watermark_column is not None
        self.cursor_path = config.watermark_column
        self._cursor_is_datetime = cursor_is_datetime

    def pull(self, since: Any | None) -> Iterator[dict[str, Any]]:
        """Yield rows as dicts of column name to value.

        Raises:
            SourceAuthError: the database refused the login.
            SourceError: the database is unreachable or the query fails.

        """
        import sqlalchemy as sa

        config = self._config
        query, params = config.query.strip().rstrip(";"), {}
        if since is not None and config.watermark_column:
            column = config.watermark_column
            query = f"SELECT * FROM ({query}) AS src WHERE src.{column} >= :since ORDER BY src.{column}"
            params["since"] = datetime.fromisoformat(since) if self._cursor_is_datetime else since
        try:
            engine = sa.create_engine(config.database_url())
        except (sa.exc.ArgumentError, ImportError) as err:
            raise SourceError(f"source {config.name}: bad database URL: {err}") from err
        try:
            with engine.connect() as connection:
                result = connection.execution_options(stream_results=True, yield_per=config.fetch_size).execute(
                    sa.text(query), params
                )
                for row in result.mappings():
                    yield dict(row)
        except sa.exc.OperationalError as err:
            message = str(err.orig or err).strip().splitlines()[0]
            if "authentication" in message.lower() or "password" in message.lower():
                raise SourceAuthError(f"source {config.name}: the database refused the login: {message}") from err
            raise SourceError(f"source {config.name}: database unavailable or query failed: {message}") from err
        except sa.exc.SQLAlchemyError as err:
            raise SourceError(f"source {config.name}: query failed: {str(err).splitlines()[0]}") from err
        finally:
            engine.dispose()
