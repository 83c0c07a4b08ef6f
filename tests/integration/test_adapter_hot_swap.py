"""Adapter lifecycle through the running app: register, activate, swap under load, canary, roll back."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from services.app import build_app
from tests.conftest import embedder_args, llm_args, load_sample_kb, orchestrator_args, retriever_args

pytestmark = pytest.mark.integration

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
        "orchestrator": orchestrator_args(admin_api_keys=["admin-key"]),
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
    session = session or uuid.uuid4().hex
    reply = client.post("/v1/chat", json={"user_id": "u", "message": QUESTION, "session_id": session}, headers=CHAT)
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
    assert client.get("/admin/adapters", headers=CHAT).status_code == 401
    assert client.get("/admin/adapters", headers=ADMIN).status_code == 200


def test_invalid_versions_are_rejected_with_the_fault(client: httpx.Client) -> None:
    reply = client.post("/admin/adapters/lumen-voice/versions", json={"version": "v-broken"}, headers=ADMIN)
    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "code": "invalid_adapter",
        "message": "rank r=64 exceeds the engine's max_lora_rank 8",
    }
    missing = client.post("/admin/adapters/lumen-voice/versions", json={"version": "v9"}, headers=ADMIN)
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
    unknown_tenant = client.put("/admin/tenants/ghost/adapter", json={"adapter": "x", "version": "y"}, headers=ADMIN)
    assert unknown_tenant.status_code == 404


def test_swapping_under_load_never_fails_or_mixes_versions(
    client: httpx.Client, base_url: str, references: dict[str | None, str]
) -> None:
    activate(client, "v1")

    async def load() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:

            async def one(n: int) -> dict[str, Any]:
                body = {"user_id": "u", "message": QUESTION, "session_id": f"load-{n}"}
                reply = await http.post("/v1/chat", json=body, headers=CHAT)
                assert reply.status_code == 200, reply.text
                result: dict[str, Any] = reply.json()
                return result

            async def swaps() -> None:
                for version in ("v2", "v1", "v2", "v1"):
                    await asyncio.to_thread(activate, client, version)

            results = await asyncio.gather(*(one(n) for n in range(24)), swaps())
            return [r for r in results if r is not None]

    replies = asyncio.run(load())
    assert len(replies) == 24
    for reply in replies:
        assert reply["adapter"] in {"lumen-voice@v1", "lumen-voice@v2"}
        assert reply["response"] == references[reply["adapter"]]


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
    sessions = [f"canary-{n}" for n in range(16)]
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
