"""No shopper ever sees another's conversation: random (tenant, user, session) tuples against the pipeline."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.chat.contracts import ChatRequest, FeedbackRequest
from services.chat.pipeline import ChatPipeline
from services.config import OrchestratorConfig, SamplingConfig
from services.errors import NotFoundError
from services.schemas import ChatMessage, GenerationChunk
from services.sessions import SessionIds, SessionMemory
from tests.conftest import orchestrator_args
from tests.test_pipeline import Retriever

TENANTS = ["lumen", "voltmart", "nordic"]
USERS = [f"shopper-{n}" for n in range(8)]


class Echo:
    """Answers every message with "re: <message>" and keeps the prompt it was given."""

    def __init__(self) -> None:
        self.prompts: list[list[ChatMessage]] = []

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        self.prompts.append(messages)
        yield GenerationChunk(text=f"re: {messages[-1].content}", finish_reason="stop")


def isolation_pipeline(
    sessions: SessionMemory | None = None, session_ids: SessionIds | None = None
) -> tuple[ChatPipeline, Echo]:
    """A pipeline serving three tenants, whose model echoes the message."""
    tenants = [{"tenant": t, "persona": f"You serve {t}.", "api_keys": [f"{t}-key"]} for t in TENANTS]
    args = orchestrator_args(tenants=tenants, structured_replies=False, session={"max_turns": 50})
    config = OrchestratorConfig.model_validate(args)
    generator = Echo()
    chat = ChatPipeline(config, Retriever(0.9), generator, sessions=sessions, session_ids=session_ids)
    return chat, generator


async def random_conversations(chat: ChatPipeline, generator: Echo, requests: int, seed: int) -> int:
    """Send ``requests`` messages of random shoppers to random sessions; check every prompt and refusal.

    Each request continues one of the shopper's own sessions, starts a new one, presents a
    session of another shopper or tenant, or presents an id the client made up. Returns the
    number of foreign presentations (all refused).
    """
    rng = random.Random(seed)
    tenants = {t.tenant: t for t in chat._config.tenants}
    owned: dict[tuple[str, str], list[str]] = {}  # (tenant, user) -> its session ids
    said: dict[str, list[str]] = {}  # session id -> the messages sent in it, in order
    foreign = 0
    for n in range(requests):
        tenant, user = rng.choice(TENANTS), rng.choice(USERS)
        mine = owned.setdefault((tenant, user), [])
        others = [s for key, ids in owned.items() if key != (tenant, user) for s in ids]
        roll = rng.random()
        message = f"message {n} from {user} of {tenant}"
        if roll < 0.2 and others:
            foreign += 1
            presented = rng.choice(others) if rng.random() < 0.8 else rng.choice(["1", "abc", f"{n}.x", "s.s"])
            with pytest.raises(NotFoundError):
                await chat.answer(tenants[tenant], ChatRequest(user_id=user, message=message, session_id=presented))
            continue
        session = rng.choice(mine) if mine and roll < 0.7 else None
        calls = len(generator.prompts)
        reply = await chat.answer(tenants[tenant], ChatRequest(user_id=user, message=message, session_id=session))
        assert len(generator.prompts) == calls + 1
        if session is None:
            mine.append(reply.session_id)
        history = [m.content for m in generator.prompts[-1][1:-1] if m.role == "user"]
        assert history == said.get(reply.session_id, []), "a prompt held turns of another conversation"
        said.setdefault(reply.session_id, []).append(message)
    return foreign


async def test_a_thousand_random_tuples_never_read_another_shoppers_or_tenants_conversation() -> None:
    chat, generator = isolation_pipeline()
    foreign = await random_conversations(chat, generator, requests=1000, seed=7)
    assert foreign > 100  # the mix really presented other shoppers' sessions


async def test_feedback_on_another_shoppers_reply_is_refused_like_a_missing_one() -> None:
    chat, _ = isolation_pipeline()
    lumen = chat._config.tenants[0]
    reply = await chat.answer(lumen, ChatRequest(user_id="shopper-1", message="Returns?"))
    verdict = FeedbackRequest(session_id=reply.session_id, user_id="shopper-2", reply_id=reply.reply_id, helpful=True)
    with pytest.raises(NotFoundError):
        await chat.feedback(lumen, verdict)
    await chat.feedback(lumen, verdict.model_copy(update={"user_id": "shopper-1"}))  # its own shopper may
