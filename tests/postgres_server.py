"""A throwaway PostgreSQL server for the SQL-source tests.

``CS_TEST_POSTGRES_URL`` points the tests at an existing server instead. Otherwise the
tests start their own: ``initdb`` into a fresh folder and ``pg_ctl start`` on a free port
(as the ``postgres`` user when run as root, which PostgreSQL refuses to run as).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cs_testing.cluster import free_port


def _binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class PostgresInstance:
    """A server of the tests' own, which a test may stop (an outage) and start again."""

    url: str
    _ctl: list[str]
    _options: str
    _log: str

    def stop(self) -> None:
        """Stop at once, as a crash would."""
        subprocess.run([*self._ctl, "-m", "immediate", "stop"], check=True, capture_output=True)

    def start(self) -> None:
        """Start again on the same port and data."""
        subprocess.run(
            [*self._ctl, "-o", self._options, "-l", self._log, "-w", "start"], check=True, capture_output=True
        )


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a PostgreSQL database the caller may freely change."""
    if url := os.environ.get("CS_TEST_POSTGRES_URL"):
        yield url
        return
    with postgres_instance() as instance:
        yield instance.url


@contextmanager
def postgres_instance() -> Iterator[PostgresInstance]:
    """Start a throwaway server (``initdb`` into a fresh folder); yield it; remove it after."""
    bin_dir = _binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: install it or set CS_TEST_POSTGRES_URL")
    root = Path(tempfile.mkdtemp(prefix="cs-pg-"))
    data, port = root / "data", free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    ctl = [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data)]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        instance = PostgresInstance(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", ctl, options, str(root / "log")
        )
        instance.start()
        try:
            yield instance
        finally:
            subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
