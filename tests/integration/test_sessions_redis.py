"""Redis session memory on a real Redis server: shared by replicas, expiring, outages reported."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from cs_testing.cluster import free_port
from services.chat.contracts import ChatRequest
from services.chat.pipeline import ChatPipeline
from services.config import OrchestratorConfig, SessionConfig
from services.errors import DependencyUnavailableError
from services.sessions import RedisSessionMemory, SessionIds, Turn
from tests.conftest import orchestrator_args
from tests.redis_server import redis_server
from tests.test_pipeline import Generator, Retriever

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def replica(url: str) -> tuple[ChatPipeline, Generator]:
    """One orchestrator replica's pipeline: its own Redis connection, stand-in retriever and LLM."""
    config = OrchestratorConfig.model_validate(orchestrator_args(session={"backend": "redis", "max_turns": 4}))
    generator = Generator()
    sessions = RedisSessionMemory(config.session, url)
    ids = SessionIds(b"the key every replica shares......")
    return ChatPipeline(config, Retriever(0.9), generator, sessions=sessions, session_ids=ids), generator


async def test_a_conversation_continues_on_another_replica(redis_url: str) -> None:
    first, _ = replica(redis_url)
    second, generator = replica(redis_url)
    tenant = first._config.tenants[0]
    reply = await first.answer(tenant, ChatRequest(user_id="u", message="How long are returns?"))
    await second.answer(tenant, ChatRequest(user_id="u", message="And refunds?", session_id=reply.session_id))
    prompt = [m.content for m in generator.calls[0][1:]]
    # The decoded answer (structured replies, as shipped), not the model's JSON.
    assert prompt == ["How long are returns?", 'Within 7 days \u2014 see "Returns".', "And refunds?"]


async def test_sessions_are_tenant_scoped_trimmed_and_expire(redis_url: str) -> None:
    memory = RedisSessionMemory(SessionConfig(backend="redis", max_turns=2, ttl_s=120), redis_url)
    for n in range(3):
        await memory.append("lumen", "s1", Turn(f"u{n}", f"a{n}"))
    assert [t.user for t in await memory.history("lumen", "s1")] == ["u1", "u2"]
    assert await memory.history("other", "s1") == []
    raw = redis.Redis.from_url(redis_url)
    assert raw.llen(RedisSessionMemory.key("lumen", "s1")) == 2
    assert 0 < raw.ttl(RedisSessionMemory.key("lumen", "s1")) <= 120
    raw.close()
    await memory.close()


async def test_a_redis_outage_is_a_503_not_a_forgotten_conversation() -> None:
    memory = RedisSessionMemory(SessionConfig(backend="redis"), f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(DependencyUnavailableError, match="session memory \\(Redis\\) failed"):
        await memory.history("lumen", "s1")


async def test_random_shoppers_on_redis_sessions_never_read_another_conversation(redis_url: str) -> None:
    from tests.test_session_isolation import isolation_pipeline, random_conversations

    memory = RedisSessionMemory(SessionConfig(backend="redis", max_turns=50), redis_url)
    chat, generator = isolation_pipeline(memory, SessionIds(b"the key every replica shares......"))
    assert await random_conversations(chat, generator, requests=300, seed=11) > 20
    await memory.close()
