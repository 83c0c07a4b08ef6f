"""Session memory: the recent turns of each conversation, behind one interface.

Two backends: in process (the dev default; a conversation is bound to one orchestrator
replica) and Redis (production; any replica continues any conversation, and idle
conversations expire after ``ttl_s``). Keys always include the tenant, so one brand can
never read another's session even if session ids collide.

What goes into a prompt is bounded twice: at most ``max_turns`` turns, and of those only
the most recent that fit ``max_history_tokens`` (estimated; see :func:`estimate_tokens`).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Protocol

from services.config import SessionConfig
from services.errors import DependencyUnavailableError


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation."""

    user: str
    assistant: str
    reply_id: str = ""  # lets feedback name the reply it is about


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def estimate_tokens(text: str) -> int:
    """Tokens of text for a Qwen-style BPE, without calling the tokenizer.

    About one token per CJK character and one per four other characters; close enough to
    budget a prompt, and the engine's own context check stays the hard limit.
    """
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk + 3) // 4


def within_budget(turns: list[Turn], max_tokens: int) -> list[Turn]:
    """The most recent turns whose estimated tokens add up to at most ``max_tokens``."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(turns):
        used += estimate_tokens(turn.user) + estimate_tokens(turn.assistant)
        if used > max_tokens:
            break
        kept.append(turn)
    return kept[::-1]


class SessionMemory(Protocol):
    """Where conversations are kept."""

    async def history(self, tenant: str, session_id: str) -> list[Turn]:
        """Recent turns of a session, oldest first, within the turn and token bounds."""
        ...

    async def append(self, tenant: str, session_id: str, turn: Turn) -> None:
        """Record a finished turn."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class InProcessSessionMemory:
    """Sessions in this process, least recently used dropped beyond ``max_sessions``."""

    def __init__(self, config: SessionConfig) -> None:
        self._config = config
        self._sessions: OrderedDict[tuple[str, str], list[Turn]] = OrderedDict()

    async def history(self, tenant: str, session_id: str) -> list[Turn]:
        """Recent turns, oldest first."""
        turns = self._sessions.get((tenant, session_id), [])
        if turns:
            self._sessions.move_to_end((tenant, session_id))
        if not self._config.max_turns:
            return []
        return within_budget(turns[-self._config.max_turns :], self._config.max_history_tokens)

    async def append(self, tenant: str, session_id: str, turn: Turn) -> None:
        """Record a turn; keep at most ``max_turns`` per session."""
        key = (tenant, session_id)
        turns = self._sessions.setdefault(key, [])
        turns.append(turn)
        del turns[: -max(self._config.max_turns, 1)]
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._config.max_sessions:
            self._sessions.popitem(last=False)

    async def close(self) -> None:
        """Nothing to release."""


class RedisSessionMemory:
    """Sessions in Redis: one list per session, trimmed to ``max_turns``, expiring after ``ttl_s`` idle.

    A Redis outage is reported (503), not hidden: answering without the conversation would
    silently give wrong answers to follow-up questions.
    """

    def __init__(self, config: SessionConfig, url: str) -> None:
        from redis.asyncio import Redis

        self._config = config
        self._redis = Redis.from_url(url, socket_timeout=config.redis_timeout_s, socket_connect_timeout=5)

    @staticmethod
    def key(tenant: str, session_id: str) -> str:
        """Redis key of a session."""
        return f"cs:session:{tenant}:{session_id}"

    async def history(self, tenant: str, session_id: str) -> list[Turn]:
        """Recent turns, oldest first."""
        if not self._config.max_turns:
            return []
        try:
            raw = await self._redis.lrange(self.key(tenant, session_id), -self._config.max_turns, -1)
        except Exception as err:
            raise DependencyUnavailableError(f"session memory (Redis) failed: {type(err).__name__}: {err}") from err
        turns = [Turn(**json.loads(item)) for item in raw]
        return within_budget(turns, self._config.max_history_tokens)

    async def append(self, tenant: str, session_id: str, turn: Turn) -> None:
        """Push the turn, trim the list and renew the expiry, in one round trip."""
        key = self.key(tenant, session_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, json.dumps(asdict(turn), ensure_ascii=False))
                pipe.ltrim(key, -max(self._config.max_turns, 1), -1)
                pipe.expire(key, self._config.ttl_s)
                await pipe.execute()
        except Exception as err:
            raise DependencyUnavailableError(f"session memory (Redis) failed: {type(err).__name__}: {err}") from err

    async def ping(self) -> None:
        """Raise when Redis does not answer."""
        try:
            await self._redis.ping()
        except Exception as err:
            raise DependencyUnavailableError(f"session memory (Redis) failed: {type(err).__name__}: {err}") from err

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def open_session_memory(config: SessionConfig, redis_url: str | None) -> SessionMemory:
    """The configured backend; Redis needs a URL (``session.redis_url`` or ``CS_REDIS_URL``).

    Raises:
        ValueError: Redis is chosen but no URL is given.

    """
    if config.backend == "memory":
        return InProcessSessionMemory(config)
    url = redis_url or config.redis_url
    if not url:
        raise ValueError("session.backend is redis but neither session.redis_url nor CS_REDIS_URL is set")
    return RedisSessionMemory(config, url)
