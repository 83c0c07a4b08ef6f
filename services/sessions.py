"""Session memory: the recent turns of each conversation, behind one interface.

Two backends: in process (the dev default; a conversation is bound to one orchestrator
replica) and Redis (production; any replica continues any conversation, and idle
conversations expire after ``ttl_s``). Keys always include the tenant, so one brand can
never read another's session even if session ids collide.

What goes into a prompt is bounded twice: at most ``max_turns`` turns, and of those only
the most recent that fit ``max_history_tokens`` (estimated; see :func:`estimate_tokens`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
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

    async def forget(self, tenant: str, session_ids: list[str]) -> None:
        """Delete sessions at once (a shopper's erasure)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class SessionIds:
    """Issues session ids bound to one (tenant, user) and recognizes them when presented again.

    An id is a random nonce and an HMAC-SHA256 of (tenant, user, nonce) under the replicas'
    shared key, so it is unguessable, any replica can check it without a lookup, and an id
    presented by another user or under another tenant's key is simply not theirs: it
    neither reveals nor extends the conversation it was issued for.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        # Without a shared key each replica makes its own: fine for in-process sessions,
        # which live and die with the replica anyway.
        self._secret = secret or secrets.token_bytes(32)

    def issue(self, tenant: str, user_id: str) -> str:
        """A new session id of this user."""
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._mac(tenant, user_id, nonce)}"

    def owns(self, tenant: str, user_id: str, session_id: str) -> bool:
        """Whether ``session_id`` was issued to this user of this tenant."""
        nonce, dot, mac = session_id.rpartition(".")
        return bool(dot and nonce) and hmac.compare_digest(mac, self._mac(tenant, user_id, nonce))

    def _mac(self, tenant: str, user_id: str, nonce: str) -> str:
        message = "\0".join((tenant, user_id, nonce)).encode("utf-8", "surrogatepass")
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(digest).decode("ascii")


class InProcessSessionMemory:
    """Sessions in this process: per tenant, its least recently used dropped beyond ``max_sessions``.

    The bound is per tenant so that one tenant opening sessions by the thousand never
    evicts another tenant's conversations.
    """

    def __init__(self, config: SessionConfig) -> None:
        self._config = config
        self._tenants: dict[str, OrderedDict[str, list[Turn]]] = {}

    async def history(self, tenant: str, session_id: str) -> list[Turn]:
        """Recent turns, oldest first."""
        sessions = self._tenants.get(tenant)
        turns = sessions.get(session_id, []) if sessions is not None else []
        if turns and sessions is not None:
            sessions.move_to_end(session_id)
        if not self._config.max_turns:
            return []
        return within_budget(turns[-self._config.max_turns :], self._config.max_history_tokens)

    async def append(self, tenant: str, session_id: str, turn: Turn) -> None:
        """Record a turn; keep at most ``max_turns`` per session."""
        sessions = self._tenants.setdefault(tenant, OrderedDict())
        turns = sessions.setdefault(session_id, [])
        turns.append(turn)
        del turns[: -max(self._config.max_turns, 1)]
        sessions.move_to_end(session_id)
        while len(sessions) > self._config.max_sessions:
            sessions.popitem(last=False)

    async def forget(self, tenant: str, session_ids: list[str]) -> None:
        """Delete sessions."""
        sessions = self._tenants.get(tenant, OrderedDict())
        for session_id in session_ids:
            sessions.pop(session_id, None)

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

    async def forget(self, tenant: str, session_ids: list[str]) -> None:
        """Delete sessions in one call."""
        if not session_ids:
            return
        try:
            await self._redis.delete(*(self.key(tenant, s) for s in session_ids))
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
