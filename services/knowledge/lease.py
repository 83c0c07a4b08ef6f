"""Sync leases: one knowledge sync per tenant at a time, across every Retriever replica.

A sync stages rows, retires others and commits; a second run that began meanwhile would
clean up the first as "unfinished" and delete what it staged. So a run holds its tenant's
lease from before its first read to after its commit, and a run that cannot have it is
refused at once (409), changing nothing.

Two backends: in process (Milvus Lite, which admits exactly one Retriever replica) and
Redis (a Milvus server, any number of replicas), where the lease is redis-py's ``Lock``: a
key set only if absent, with a token, expiring after ``ttl_s`` unless renewed, so a
replica that dies mid-run frees it; the holder renews it every ``ttl_s / 3`` while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from services.errors import ConflictError, DependencyUnavailableError

logger = logging.getLogger(__name__)


def busy(tenant: str) -> ConflictError:
    """The refusal of a run while another holds the tenant's lease."""
    return ConflictError(f"a knowledge sync of tenant {tenant} is running; nothing was changed, try again after it")


class SyncLease(Protocol):
    """Holds a tenant's sync lease for the duration of one run."""

    def hold(self, tenant: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Enter holding the lease, or raise :class:`ConflictError` when another run holds it."""
        ...


class InProcessSyncLease:
    """Leases of this process: enough where only one Retriever replica writes (Milvus Lite)."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextlib.asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        """Hold the tenant's lease; refuse at once if held."""
        if tenant in self._held:
            raise busy(tenant)
        self._held.add(tenant)
        try:
            yield
        finally:
            self._held.discard(tenant)


class RedisSyncLease:
    """Leases in Redis, shared by every Retriever replica."""

    def __init__(self, url: str, ttl_s: float = 60) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._ttl_s = ttl_s

    @contextlib.asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        """Hold the tenant's lease, renewing it while the run lasts; refuse at once if another holds it."""
        from redis.exceptions import LockError, RedisError

        lock = self._redis.lock(f"cs:sync-lease:{tenant}", timeout=self._ttl_s, blocking=False)
        try:
            acquired = await lock.acquire()
        except RedisError as err:
            raise DependencyUnavailableError(f"sync lease (Redis) failed: {type(err).__name__}") from err
        if not acquired:
            raise busy(tenant)
        renewal = asyncio.create_task(self._renew(lock))
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            with contextlib.suppress(LockError, RedisError):  # expired already: nothing to free
                await lock.release()

    async def _renew(self, lock: object) -> None:
        from redis.exceptions import LockError, RedisError

        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                await lock.reacquire()  # type: ignore[attr-defined]
            except (LockError, RedisError) as err:
                logger.warning("sync lease renewal failed: %s", type(err).__name__)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
