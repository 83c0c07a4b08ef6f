"""The HTTP layer on its own: health aggregation and error mapping (fake pipeline)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from cs_tools.api_key import main as api_key_main
from services.api.factory import create_api
from services.config import OrchestratorConfig
from services.control_plane.directory import TenantDirectory
from services.control_plane.models import utcnow
from services.errors import KnowledgeBaseUnavailableError
from tests.conftest import orchestrator_args


class FailingPipeline:
    """Stands in for the dialogue pipeline: every answer hits a Milvus outage."""

    async def answer(self, *_: Any) -> Any:
        raise KnowledgeBaseUnavailableError("Milvus search failed: connection refused")


def make_client(health: dict[str, str]) -> TestClient:
    config = OrchestratorConfig.model_validate(orchestrator_args())

    async def check() -> dict[str, str]:
        return health

    directory = TenantDirectory.from_config(config.tenants)
    return TestClient(create_api(config, FailingPipeline(), directory, check))  # type: ignore[arg-type]


def test_health_is_503_naming_the_failing_deployment() -> None:
    reply = make_client({"embedder": "ok", "retriever": "error: Milvus describe failed", "llm": "ok"}).get("/healthz")
    assert reply.status_code == 503
    assert reply.json()["status"] == "unavailable"
    assert reply.json()["deployments"]["retriever"] == "error: Milvus describe failed"


def test_outage_is_a_503_with_its_code_not_an_empty_answer() -> None:
    reply = make_client({}).post("/v1/chat", json={"user_id": "u", "message": "hi"}, headers={"X-API-Key": "test-key"})
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "2"
    error = reply.json()["error"]
    assert error.pop("request_id")  # leads to the request's log lines
    assert error == {"code": "knowledge_base_unavailable", "message": "Milvus search failed: connection refused"}


def test_env_keys_must_name_configured_tenants() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args())
    with pytest.raises(ValueError, match="names tenant 'ghost'"):
        TenantDirectory.from_config(config.tenants, env_keys={"k": "ghost"})
    directory = TenantDirectory.from_config(config.tenants, env_keys={"prod-key": "lumen"})
    assert directory.grant("prod-key", utcnow()) is not None and directory.grant("test-key", utcnow()) is not None
    assert directory.grant("nope", utcnow()) is None


def test_admin_checks_the_key_before_revealing_tenants(tmp_path: Any) -> None:
    from services.adapters.admin import AdapterAdmin
    from services.adapters.registry import AdapterRegistry

    async def no_engine(adapter: str) -> None:
        return None

    config = OrchestratorConfig.model_validate(orchestrator_args())

    async def check() -> dict[str, str]:
        return {}

    admin = AdapterAdmin(AdapterRegistry(tmp_path), "m", 8, no_engine)
    client = TestClient(
        create_api(
            config,
            FailingPipeline(),  # type: ignore[arg-type]
            TenantDirectory.from_config(config.tenants, admin_keys=["admin"]),
            check,
            adapter_admin=admin,
        )
    )
    body = {"adapter": "a", "version": "v1"}
    assert client.put("/admin/tenants/ghost/adapter", json=body).status_code == 401
    assert client.put("/admin/tenants/ghost/adapter", json=body, headers={"X-API-Key": "admin"}).status_code == 404
    missing = client.put("/admin/tenants/lumen/adapter", json=body, headers={"X-API-Key": "admin"})
    assert missing.status_code == 400 and "a@v1 is not registered" in missing.json()["error"]["message"]
    bad_name = client.post("/admin/adapters/bad name!/versions", json={"version": "v1"}, headers={"X-API-Key": "admin"})
    assert bad_name.status_code == 422 and bad_name.json()["error"]["message"].startswith("path.name:")


def test_admin_api_is_off_without_keys() -> None:
    reply = make_client({}).get("/admin/adapters", headers={"X-API-Key": "anything"})
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "admin_disabled"


def test_keys_are_kept_and_given_as_digests_only(capsys: Any) -> None:
    from services.security import key_digest

    api_key_main(["new"])
    out = capsys.readouterr().out
    key = out.split()[1]
    digest = out.split("digest: ")[1].split()[0]
    assert digest == key_digest(key) and digest.startswith("sha256:") and key not in digest
    tenants = OrchestratorConfig.model_validate(orchestrator_args()).tenants
    stored = tenants[0].model_copy(update={"api_keys": []})
    directory = TenantDirectory.from_config([stored], env_keys={digest: "lumen"})
    assert key not in repr(directory._snapshot)
    found = directory.grant(key, utcnow())
    assert found is not None and found.tenant == "lumen"
    assert directory.grant(digest, utcnow()) is None  # a leaked digest is not a key
    assert directory.grant(key + "x", utcnow()) is None


def test_a_key_given_to_two_tenants_is_refused_even_as_digest_and_key() -> None:
    from services.security import key_digest

    tenants = OrchestratorConfig.model_validate(orchestrator_args()).tenants
    other = tenants[0].model_copy(update={"tenant": "other", "api_keys": []})
    with pytest.raises(ValueError, match="more than one tenant"):
        TenantDirectory.from_config([tenants[0], other], env_keys={key_digest("test-key"): "other"})


def test_every_response_names_the_replica_that_served_it() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args())

    async def check() -> dict[str, str]:
        return {"llm": "ok"}

    directory = TenantDirectory.from_config(config.tenants)
    app = create_api(config, FailingPipeline(), directory, check, served_by="replica-7")  # type: ignore[arg-type]
    client = TestClient(app)
    assert client.get("/healthz").headers["X-Served-By"] == "replica-7"
    error = client.post("/v1/chat", json={"user_id": "u", "message": "hi"}, headers={"X-API-Key": "test-key"})
    assert error.status_code == 503 and error.headers["X-Served-By"] == "replica-7"
    assert "X-Served-By" not in make_client({}).get("/healthz").headers


def test_liveness_asks_no_dependency() -> None:
    assert make_client({"llm": "error: down"}).get("/livez").json() == {"status": "ok"}


async def test_readiness_answers_from_the_last_probe_while_a_probe_hangs() -> None:
    import asyncio
    import time

    from services.api.health import HealthMonitor

    calls = 0
    hang = asyncio.Event()

    async def probe() -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls > 1:
            await hang.wait()  # the LLM replica was killed: its check never answers
        return {"llm": "ok"}

    monitor = HealthMonitor(probe, interval_s=0.01)
    assert (await monitor.reading())[0] == {"llm": "ok"}
    while calls < 2:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    results, age = await monitor.reading()
    assert results == {"llm": "ok"} and age is not None and time.monotonic() - started < 0.1
    await monitor.close()


async def test_readiness_is_starting_until_the_first_probe_ends() -> None:
    import asyncio

    from services.api.health import HealthMonitor

    async def slow() -> dict[str, str]:
        await asyncio.sleep(10)
        return {}

    monitor = HealthMonitor(slow, interval_s=1)
    assert await monitor.reading(wait_s=0.05) == (None, None)
    await monitor.close()


class RecordingKnowledge:
    """Stands in for the Retriever's ingest: records which tenant's knowledge was read."""

    def __init__(self) -> None:
        self.read: list[str] = []

    async def state(self, tenant: str) -> dict[str, Any]:
        self.read.append(tenant)
        return {"generation": 1, "sources": {}}

    async def ingest(self, *args: Any) -> dict[str, Any]:
        raise AssertionError("not called here")


def knowledge_client(**overrides: Any) -> tuple[TestClient, RecordingKnowledge]:
    tenants = [
        {"tenant": "lumen", "persona": "p", "api_keys": ["test-key"], "ingest_api_keys": ["lumen-ingest"]},
        {"tenant": "volt", "persona": "p", "api_keys": ["volt-key"]},
    ]
    config = OrchestratorConfig.model_validate(orchestrator_args(tenants=tenants, **overrides))

    async def check() -> dict[str, str]:
        return {}

    knowledge = RecordingKnowledge()
    api = create_api(
        config, FailingPipeline(), TenantDirectory.from_config(config.tenants, admin_keys=["admin"]),  # type: ignore[arg-type]
        check, knowledge=knowledge,  # type: ignore[arg-type]
    )  # fmt: skip
    return TestClient(api), knowledge


def test_a_tenants_ingest_key_syncs_its_own_knowledge_and_nothing_else() -> None:
    client, knowledge = knowledge_client()
    ingest = {"X-API-Key": "lumen-ingest"}
    assert client.get("/admin/knowledge/lumen", headers=ingest).status_code == 200
    other = client.get("/admin/knowledge/volt", headers=ingest)
    assert other.status_code == 403 and "another tenant" in other.json()["error"]["message"]
    assert client.get("/admin/adapters", headers=ingest).status_code == 403  # a valid key, not an admin key
    assert client.get("/admin/knowledge/volt", headers={"X-API-Key": "admin"}).status_code == 200
    assert client.get("/admin/knowledge/lumen", headers={"X-API-Key": "test-key"}).status_code == 403
    assert knowledge.read == ["lumen", "volt"]


def test_the_api_pages_are_off_when_the_config_says_so() -> None:
    on, _ = knowledge_client()
    off, _ = knowledge_client(api_docs=False)
    assert on.get("/openapi.json").status_code == 200 and on.get("/docs").status_code == 200
    assert off.get("/openapi.json").status_code == 404 and off.get("/docs").status_code == 404
