"""In-process session memory: turn and token bounds, tenant scope, eviction."""

from __future__ import annotations

from services.config import SessionConfig
from services.sessions import InProcessSessionMemory, SessionIds, Turn, estimate_tokens, within_budget


async def test_sessions_keep_last_turns_and_are_tenant_scoped() -> None:
    memory = InProcessSessionMemory(SessionConfig(max_turns=2))
    for n in range(3):
        await memory.append("t1", "s", Turn(user=f"u{n}", assistant=f"a{n}"))
    assert [t.user for t in await memory.history("t1", "s")] == ["u1", "u2"]
    assert await memory.history("t2", "s") == []


async def test_sessions_evict_least_recently_used() -> None:
    memory = InProcessSessionMemory(SessionConfig(max_sessions=2, max_turns=4))
    await memory.append("t", "old", Turn("u", "a"))
    await memory.append("t", "mid", Turn("u", "a"))
    await memory.history("t", "old")  # touch: "mid" is now the least recently used
    await memory.append("t", "new", Turn("u", "a"))
    assert await memory.history("t", "mid") == []
    assert await memory.history("t", "old") and await memory.history("t", "new")


async def test_zero_turns_sends_no_history() -> None:
    memory = InProcessSessionMemory(SessionConfig(max_turns=0))
    await memory.append("t", "s", Turn("u", "a"))
    assert await memory.history("t", "s") == []


async def test_history_keeps_the_newest_turns_within_the_token_budget() -> None:
    memory = InProcessSessionMemory(SessionConfig(max_turns=10, max_history_tokens=60))
    long_answer = "Our return policy allows returns within seven days. " * 3  # ~40 tokens
    await memory.append("t", "s", Turn("first question", long_answer))
    await memory.append("t", "s", Turn("second question", long_answer))
    kept = await memory.history("t", "s")
    assert [t.user for t in kept] == ["second question"]


def test_token_estimate_counts_cjk_per_character() -> None:
    assert estimate_tokens("退货政策") == 4
    assert estimate_tokens("return policy") == 4
    assert within_budget([Turn("a", "b")], 0) == []


def test_a_session_id_is_recognized_only_for_the_user_and_tenant_it_was_issued_to() -> None:
    ids = SessionIds(b"k" * 32)
    issued = ids.issue("lumen", "shopper-1")
    assert ids.owns("lumen", "shopper-1", issued)
    assert not ids.owns("lumen", "shopper-2", issued)
    assert not ids.owns("voltmart", "shopper-1", issued)
    assert not any(ids.owns("lumen", "shopper-1", made_up) for made_up in ["1", "a.b", ".", issued + "x"])
    # Another replica with the shared key recognizes it; one with another key does not.
    assert SessionIds(b"k" * 32).owns("lumen", "shopper-1", issued)
    assert not SessionIds(b"j" * 32).owns("lumen", "shopper-1", issued)


def test_issued_ids_are_unguessable_and_fit_the_session_id_field() -> None:
    import re

    from services.chat.contracts import SESSION_ID_PATTERN

    ids = SessionIds()
    issued = {ids.issue("t", "u") for _ in range(1000)}
    assert len(issued) == 1000 and all(re.fullmatch(SESSION_ID_PATTERN, s) and len(s) <= 128 for s in issued)


async def test_one_tenant_opening_many_sessions_never_evicts_another_tenants() -> None:
    memory = InProcessSessionMemory(SessionConfig(max_sessions=2, max_turns=4))
    await memory.append("quiet", "s", Turn("u", "a"))
    for n in range(50):
        await memory.append("busy", f"s{n}", Turn("u", "a"))
    assert await memory.history("quiet", "s")
    assert await memory.history("busy", "s49") and not await memory.history("busy", "s0")
