"""The one-sync-per-tenant lease, in process and on a real Redis server shared by replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.errors import ConflictError
from services.knowledge.lease import InProcessSyncLease, RedisSyncLease
from tests.redis_server import redis_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


async def test_in_process_a_second_run_of_a_tenant_is_refused_and_other_tenants_go_on() -> None:
    lease = InProcessSyncLease()
    async with lease.hold("lumen"):
        with pytest.raises(ConflictError, match="is running"):
            async with lease.hold("lumen"):
                pass
        async with lease.hold("voltmart"):
            pass
    async with lease.hold("lumen"):  # free again once the run ended
        pass


async def test_two_replicas_sharing_redis_never_run_one_tenant_at_once(redis_url: str) -> None:
    first, second = RedisSyncLease(redis_url, ttl_s=5), RedisSyncLease(redis_url, ttl_s=5)
    async with first.hold("lumen"):
        with pytest.raises(ConflictError, match="is running"):
            async with second.hold("lumen"):
                pass
    async with second.hold("lumen"):
        pass
    await first.close()
    await second.close()


async def test_a_run_longer_than_the_ttl_keeps_its_lease_by_renewing_it(redis_url: str) -> None:
    holder, other = RedisSyncLease(redis_url, ttl_s=0.6), RedisSyncLease(redis_url, ttl_s=0.6)
    async with holder.hold("volt"):
        await asyncio.sleep(1.5)  # the run's own work, past the TTL: only the renewal keeps the key
        with pytest.raises(ConflictError):
            async with other.hold("volt"):
                pass
    await holder.close()
    await other.close()


async def test_a_lease_whose_holder_died_expires_after_its_ttl(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    # What a replica killed mid-run leaves behind: its lock key, never renewed again.
    await client.set("cs:sync-lease:ghost", "dead-replica-token", px=300)
    lease = RedisSyncLease(redis_url, ttl_s=5)
    with pytest.raises(ConflictError):
        async with lease.hold("ghost"):
            pass
    while await client.exists("cs:sync-lease:ghost"):
        await asyncio.sleep(0.05)  # bounded by the 300 ms expiry
    async with lease.hold("ghost"):
        pass
    await lease.close()
    await client.aclose()
