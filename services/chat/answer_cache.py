"""Answer cache for frequent questions, in process or in Redis.

A cached answer is keyed by tenant, knowledge-base generation, adapter and the normalized
question. A knowledge sync commits a new generation, so every answer from older
knowledge is missed from then on (and expires by TTL); an adapter switch does the same.
Only answers to the first message of a conversation are cached: a follow-up depends on
the conversation before it.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections import OrderedDict
from typing import Protocol

from services.chat.contracts import ChatReply
from services.config import AnswerCacheConfig

_TRAILING = re.compile(r"[\s?？!！。.,，~～]+$")


def normalize_question(text: str) -> str:
    """Fold what does not change a question: width (NFKC), case, spacing, trailing punctuation."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _TRAILING.sub("", " ".join(folded.split()))


def cache_key(tenant: str, generation: int, adapter: str | None, question: str) -> str:
    """Key of one answer; the question is hashed so keys stay short and carry no text."""
    digest = hashlib.sha256(normalize_question(question).encode()).hexdigest()[:32]
    return f"cs:answer:{tenant}:{generation}:{adapter or '-'}:{digest}"


class AnswerCache(Protocol):
    """Where answers are cached."""

    async def get(self, key: str) -> ChatReply | None:
        """The cached reply, or None."""
        ...

    async def put(self, key: str, reply: ChatReply) -> None:
        """Cache a reply for the configured TTL."""
        ...


class InProcessAnswerCache:
    """An LRU of replies in this process, each valid for ``ttl_s``."""

    def __init__(self, config: AnswerCacheConfig) -> None:
        self._config = config
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def get(self, key: str) -> ChatReply | None:
        """A fresh entry, or None (stale entries are dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, payload = entry
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return ChatReply.model_validate_json(payload)

    async def put(self, key: str, reply: ChatReply) -> None:
        """Store, dropping the least recently used beyond ``max_entries``."""
        self._entries[key] = (time.monotonic() + self._config.ttl_s, reply.model_dump_json())
        self._entries.move_to_end(key)
        while len(self._entries) > self._config.max_entries:
            self._entries.popitem(last=False)


class RedisAnswerCache:
    """Replies in Redis with ``SET EX``; shared by every orchestrator replica.

    A cache is an optimization: when Redis fails, a lookup is a miss and a store is
    skipped (the failure is logged by the caller's metrics), rather than failing the chat.
    """

    def __init__(self, config: AnswerCacheConfig, url: str) -> None:
        from redis.asyncio import Redis

        self._config = config
        self._redis = Redis.from_url(url, socket_timeout=config.redis_timeout_s, socket_connect_timeout=2)
        self.errors = 0

    async def get(self, key: str) -> ChatReply | None:
        """The cached reply, or None (also when Redis fails)."""
        try:
            payload = await self._redis.get(key)
        except Exception:
            self.errors += 1
            return None
        return ChatReply.model_validate_json(payload) if payload else None

    async def put(self, key: str, reply: ChatReply) -> None:
        """Store with the TTL; a failure is counted, not raised."""
        try:
            await self._redis.set(key, reply.model_dump_json(), ex=self._config.ttl_s)
        except Exception:
            self.errors += 1


def open_answer_cache(config: AnswerCacheConfig, redis_url: str | None) -> AnswerCache | None:
    """The configured cache, or None when it is off.

    Raises:
        ValueError: Redis is chosen but no URL is given.

    """
    if config.backend == "off":
        return None
    if config.backend == "memory":
        return InProcessAnswerCache(config)
    url = redis_url or config.redis_url
    if not url:
        raise ValueError("answer_cache.backend is redis but neither answer_cache.redis_url nor CS_REDIS_URL is set")
    return RedisAnswerCache(config, url)
