"""The control plane on a running app: two orchestrator replicas over a real PostgreSQL server.

Tenants and keys change at runtime and reach both replicas within the refresh interval
(measured here); chats go on while PostgreSQL is down, each lost record counted; the
reviewed answers exported by the API train an adapter with ``cs-train-adapter``.
Its own app and its own PostgreSQL server: the server is stopped here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cs_tools.train_adapter import main as train_adapter
from services.adapters.registry import AdapterRegistry
from tests.conftest import embedder_args, llm_args, orchestrator_args, retriever_args, sample_app
from tests.integration.test_app_http import scraped_series
from tests.postgres_server import PostgresInstance, postgres_instance

pytestmark = pytest.mark.integration

ADMIN = {"X-API-Key": "admin-key"}
SHOP = {"X-API-Key": "test-key"}
REFRESH_S = 2.0  # the default control_plane.refresh_interval_s
IDENTITY = [
    {"instruction": "你是谁？", "input": "", "output": "我是流明家居的客服。"},
    {"instruction": "Who are you?", "input": "", "output": "Lumen Home support."},
]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresInstance]:
    with postgres_instance() as server:
        yield server


@pytest.fixture(scope="module")
def base_url(
    ray_cluster: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    minilm_dir: Path,
    tiny_llm_dir: Path,
    postgres: PostgresInstance,
) -> Iterator[str]:
    orchestrator = {
        "admin_api_keys": ["admin-key"],
        "control_plane": {"url": postgres.url, "refresh_interval_s": REFRESH_S, "store_timeout_s": 2},
        "deployment": {"num_cpus": 0.1, "num_replicas": 2},
    }
    workdir = tmp_path_factory.mktemp("control")
    with sample_app(
        "control", ray_cluster["http_url"], workdir, minilm_dir, tiny_llm_dir,
        llm={"max_model_len": 1280}, orchestrator=orchestrator,
    ) as url:  # fmt: skip
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def chat(http: httpx.Client, key: dict[str, str], message: str = "How long does a card refund take?") -> httpx.Response:
    return http.post("/v1/chat", json={"user_id": "shopper-1", "message": message}, headers=key)


def until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)
    return value


def both_replicas(http: httpx.Client, key: dict[str, str], status: int, timeout_s: float) -> float:
    """Seconds until each of the two replicas answered ``status`` (and kept answering it) for ``key``."""
    started = time.monotonic()
    settled: dict[str, float] = {}
    while len(settled) < 2:
        assert time.monotonic() - started < timeout_s, f"both replicas did not answer {status} within {timeout_s} s"
        reply = chat(http, key, "hi")
        replica = reply.headers["X-Served-By"]
        if reply.status_code == status:
            settled.setdefault(replica, time.monotonic() - started)
        else:
            assert replica not in settled, f"replica {replica} answered {reply.status_code} after {status}"
    return max(settled.values())


def test_a_runtime_tenant_and_key_reach_both_replicas_and_a_revoked_key_is_refused_by_both(
    http: httpx.Client,
) -> None:
    created = http.post(
        "/admin/tenants", json={"tenant": "acme", "persona": "You are Acme's assistant."}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    issued = http.post("/admin/keys", json={"scope": "storefront", "tenant": "acme"}, headers=ADMIN).json()
    key = {"X-API-Key": issued["key"]}
    applied = both_replicas(http, key, 200, timeout_s=REFRESH_S * 5)
    revoked = http.delete(f"/admin/keys/{issued['key_id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = both_replicas(http, key, 401, timeout_s=REFRESH_S * 5)
    print(f"\npropagation on 2 replicas (refresh {REFRESH_S} s): new key {applied:.2f} s, revocation {refused:.2f} s")
    assert refused <= REFRESH_S + 1.5  # one interval, one read of the store, one request
    listed = http.get("/admin/keys", params={"tenant": "acme"}, headers=ADMIN).json()
    assert listed[0]["last_used_at"] is not None  # written by the replicas after use


def test_replies_of_both_replicas_are_recorded_redacted_and_counted_in_insights(http: httpx.Client) -> None:
    reply = chat(http, SHOP, "My phone is 138 1234 5678, how long does a card refund take?").json()
    path = f"/admin/tenants/lumen/records/{reply['reply_id']}"
    record = until(lambda: (r := http.get(path, headers=ADMIN)).status_code == 200 and r.json(), 20, "the record")
    assert record["question"] == "My phone is [phone], how long does a card refund take?"
    assert record["answer"] == reply["response"] and record["outcome"] == reply["outcome"]
    for _ in range(4):
        chat(http, SHOP)
    insights = until(
        lambda: (r := http.get("/admin/tenants/lumen/insights", headers=ADMIN).json())["rates"]["replies"] >= 5 and r,
        20,
        "five records",
    )
    assert sum(insights["rates"]["by_outcome"].values()) == insights["rates"]["replies"]


def test_chats_go_on_while_postgres_is_down_and_each_lost_record_is_counted(
    http: httpx.Client, postgres: PostgresInstance, ray_cluster: dict[str, Any]
) -> None:
    postgres.stop()
    try:
        for _ in range(4):
            reply = chat(http, SHOP)
            assert reply.status_code == 200, reply.text
        down = http.get("/admin/tenants", headers=ADMIN)
        assert down.status_code == 503 and down.json()["error"]["code"] == "control_plane_unavailable"

        def counted() -> bool:
            series = scraped_series(ray_cluster["metrics_url"])
            misses = [s for s in series.get("ray_cs_record_misses_total", []) if s.get("application") == "control"]
            failures = series.get("ray_cs_control_plane_refresh_failures_total", [])
            return any(s.get("reason") == "store_unavailable" for s in misses) and any(
                s.get("application") == "control" for s in failures
            )

        until(counted, 60, "cs_record_misses and cs_control_plane_refresh_failures")  # Ray exports every few seconds
    finally:
        postgres.start()
    until(lambda: http.get("/admin/tenants", headers=ADMIN).status_code == 200, 30, "the store back")
    reply = chat(http, SHOP).json()
    path = f"/admin/tenants/lumen/records/{reply['reply_id']}"
    until(lambda: http.get(path, headers=ADMIN).status_code == 200, 20, "records written again")


def test_reviewed_answers_exported_by_the_api_train_an_adapter(
    http: httpx.Client, tmp_path: Path, minilm_dir: Path, tiny_llm_dir: Path
) -> None:
    replies = [chat(http, SHOP, q).json() for q in ("How long does a card refund take?", "Do you ship abroad?")]
    for reply, answer in zip(replies, ("Card refunds take 5 days.", "We ship to the EU."), strict=True):
        path = f"/admin/tenants/lumen/records/{reply['reply_id']}"
        until(lambda path=path: http.get(path, headers=ADMIN).status_code == 200, 20, "the record")
        body = {"verdict": "corrected", "answer": answer}
        assert http.put(f"{path}/review", json=body, headers=ADMIN).status_code == 200
    exported = http.get("/admin/tenants/lumen/exports/training-data", headers=ADMIN).json()
    assert {r["output"] for r in exported} >= {"Card refunds take 5 days.", "We ship to the EU."}
    (tmp_path / "reviewed.json").write_text(json.dumps(exported, ensure_ascii=False))
    (tmp_path / "identity.json").write_text(json.dumps(IDENTITY, ensure_ascii=False))
    args = {
        "embedder": embedder_args(minilm_dir),
        "retriever": retriever_args(tmp_path / "kb.db"),
        "llm": llm_args(tiny_llm_dir, tmp_path / "adapters"),
        "orchestrator": orchestrator_args(),
    }
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"import_path": "services.app:build_app", "args": args}]}))
    code = train_adapter(
        ["--config", str(config), "--tenant", "lumen", "--name", "lumen-reviewed", "--version", "v1",
         "--data", f"{tmp_path / 'identity.json'}:6", "--data", str(tmp_path / "reviewed.json"), "--epochs", "2"]
    )  # fmt: skip
    assert code == 0
    version = AdapterRegistry(tmp_path / "adapters").state().adapters["lumen-reviewed"]["v1"]
    assert version.rank == 8
