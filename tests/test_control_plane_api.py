"""The control-plane API over a real SQLite store: tenants and keys at runtime, scopes, records, insights, exports.

Two apps over one store stand for two orchestrator replicas (the integration suite runs
real Serve replicas on PostgreSQL); the chat pipeline answers with stand-in engines.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.factory import create_api
from services.chat.pipeline import ChatPipeline
from services.config import OrchestratorConfig
from services.control_plane import schema
from services.control_plane.directory import TenantDirectory, seed_keys
from services.control_plane.plane import ControlPlane
from services.control_plane.recorder import ConversationRecorder
from services.control_plane.store import ControlPlaneStore
from tests.conftest import RecordingMetrics, orchestrator_args
from tests.test_pipeline import Generator, Retriever

ADMIN = {"X-API-Key": "admin"}
SHOP = {"X-API-Key": "test-key"}


def until(condition: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """Poll ``condition`` until it is truthy (the store is written by a background task)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
    return value


class Replica:
    """One orchestrator replica's API over the shared store."""

    def __init__(self, url: str, **control_plane: Any) -> None:
        args = orchestrator_args(
            control_plane={"url": url, "refresh_interval_s": 0.05} | control_plane,
            admin_api_keys=["admin"],
            tenants=[
                {
                    "tenant": "lumen",
                    "persona": "You are the assistant of Lumen Home.",
                    "api_keys": ["test-key"],
                    "order_id_patterns": [r"\bLH-\d{4,}\b"],
                }
            ],
        )
        config = OrchestratorConfig.model_validate(args)
        assert config.control_plane is not None
        self.metrics = RecordingMetrics()
        self.store = ControlPlaneStore(url)
        seed = seed_keys(config.tenants, ["admin"], {})
        self.store.migrate()
        self.store.seed(config.tenants, seed)
        directory = TenantDirectory(config.tenants, seed, self.store, refresh_interval_s=0.05, metrics=self.metrics)
        directory.load()
        recorder = ConversationRecorder(self.store, config.control_plane, b"k" * 32, self.metrics)
        pipeline = ChatPipeline(config, Retriever(0.8), Generator(), metrics=self.metrics, recorder=recorder)
        self.plane = ControlPlane(self.store, config.control_plane, directory, recorder)

        async def healthy() -> dict[str, str]:
            return {}

        self.client = TestClient(create_api(config, pipeline, directory, healthy, control_plane=self.plane))

    def chat(self, key: dict[str, str], message: str = "How long do returns take?", user: str = "alice") -> Any:
        return self.client.post("/v1/chat", json={"user_id": user, "message": message}, headers=key)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    url = f"sqlite:///{tmp_path / 'control-plane.db'}"
    a, b = Replica(url), Replica(url)
    with a.client, b.client:
        yield a, b


def test_a_tenant_created_at_runtime_chats_on_every_replica_and_a_revoked_key_stops_on_both(
    replicas: tuple[Replica, Replica],
) -> None:
    a, b = replicas
    created = a.client.post("/admin/tenants", json={"tenant": "acme", "persona": "You are Acme's."}, headers=ADMIN)
    assert created.status_code == 201 and created.json()["persona"] == "You are Acme's."
    issued = a.client.post("/admin/keys", json={"scope": "storefront", "tenant": "acme"}, headers=ADMIN).json()
    key = {"X-API-Key": issued["key"]}
    assert a.chat(key).status_code == 200  # the replica that took the change serves it at once
    until(lambda: b.chat(key).status_code == 200)  # the other within its refresh interval
    assert a.client.delete(f"/admin/keys/{issued['key_id']}", headers=ADMIN).json()["revoked_at"]
    assert a.chat(key).status_code == 401
    until(lambda: b.chat(key).status_code == 401)
    listed = a.client.get("/admin/keys", params={"tenant": "acme"}, headers=ADMIN).json()
    assert [k["key_id"] for k in listed] == [issued["key_id"]] and issued["key"] not in json.dumps(listed)


def test_a_rotated_key_and_its_replacement_both_work_during_the_grace_period(
    replicas: tuple[Replica, Replica],
) -> None:
    a, _ = replicas
    issued = a.client.post("/admin/keys", json={"scope": "storefront", "tenant": "lumen"}, headers=ADMIN).json()
    new = a.client.post(f"/admin/keys/{issued['key_id']}/rotate", json={"grace_s": 3600}, headers=ADMIN)
    assert new.status_code == 201
    assert a.chat({"X-API-Key": issued["key"]}).status_code == 200
    assert a.chat({"X-API-Key": new.json()["key"]}).status_code == 200
    gone = a.client.post(f"/admin/keys/{new.json()['key_id']}/rotate", json={"grace_s": 0}, headers=ADMIN)
    assert a.chat({"X-API-Key": new.json()["key"]}).status_code == 401  # no grace: replaced at once
    assert a.chat({"X-API-Key": gone.json()["key"]}).status_code == 200


def test_each_scope_reaches_only_what_it_may(replicas: tuple[Replica, Replica]) -> None:
    a, _ = replicas
    a.client.post("/admin/tenants", json={"tenant": "acme", "persona": "Acme."}, headers=ADMIN)

    def key(scope: str, tenant: str | None) -> dict[str, str]:
        body = {"scope": scope, "tenant": tenant}
        return {"X-API-Key": a.client.post("/admin/keys", json=body, headers=ADMIN).json()["key"]}

    operator, ingest = key("operator", "lumen"), key("ingest", "lumen")
    assert a.client.get("/admin/tenants/lumen/insights", headers=operator).status_code == 200
    other = a.client.get("/admin/tenants/acme/insights", headers=operator)
    assert other.status_code == 403 and "another tenant" in other.json()["error"]["message"]
    assert a.client.get("/admin/tenants/lumen/insights", headers=ingest).status_code == 403
    assert a.client.get("/admin/tenants/lumen/insights", headers=SHOP).status_code == 403
    assert a.client.post("/admin/tenants", json={"tenant": "x", "persona": "p"}, headers=operator).status_code == 403
    assert a.client.get("/admin/keys", headers=operator).status_code == 403
    assert a.chat(operator).status_code == 200  # an operator chats as the assistant (the console's playground)
    assert a.chat(ingest).status_code == 403
    assert a.chat(ADMIN).status_code == 403  # the admin key belongs to no tenant
    assert a.client.get("/admin/tenants/ghost/insights", headers=ADMIN).status_code == 404
    assert a.client.get("/admin/tenants/lumen/insights", headers={"X-API-Key": "nope"}).status_code == 401


def test_replies_are_recorded_redacted_with_feedback_and_show_in_insights(replicas: tuple[Replica, Replica]) -> None:
    a, _ = replicas
    reply = a.chat(SHOP, "我的手机是13812345678，订单LH-1001的退货要多久？").json()
    a.client.post(
        "/v1/feedback",
        json={"user_id": "alice", "session_id": reply["session_id"], "reply_id": reply["reply_id"], "helpful": False},
        headers=SHOP,
    )
    path = f"/admin/tenants/lumen/records/{reply['reply_id']}"
    record = until(lambda: (r := a.client.get(path, headers=ADMIN)).status_code == 200 and r.json()).copy()
    assert record["question"] == "我的手机是[phone]，订单[order]的退货要多久？"
    assert record["outcome"] == "answered" and record["sources"][0]["doc_id"] == "returns"
    until(lambda: a.client.get(path, headers=ADMIN).json()["feedback"] == [{"helpful": False, "resolved": None}])
    found = a.client.get("/admin/tenants/lumen/insights", headers=ADMIN).json()
    assert found["rates"]["replies"] == 1 and found["rates"]["satisfaction"] == 0.0
    assert [w["reply_id"] for w in found["worst_rated"]] == [reply["reply_id"]]
    assert a.metrics.tags("cs_records_written") == [{"kind": "record"}, {"kind": "feedback"}]


def test_reviewed_answers_export_as_alpaca_and_unanswered_ones_as_a_gap_report(
    replicas: tuple[Replica, Replica],
) -> None:
    a, _ = replicas
    answered = a.chat(SHOP, "How long do returns take?").json()
    path = f"/admin/tenants/lumen/records/{answered['reply_id']}"
    until(lambda: a.client.get(path, headers=ADMIN).status_code == 200)
    corrected = a.client.put(f"{path}/review", json={"verdict": "corrected", "answer": "Within 7 days."}, headers=ADMIN)
    assert corrected.status_code == 200 and corrected.json()["review"]["verdict"] == "corrected"
    missing = a.client.put(f"{path}/review", json={"verdict": "corrected"}, headers=ADMIN)
    assert missing.status_code == 400 and "corrected answer" in missing.json()["error"]["message"]
    data = a.client.get("/admin/tenants/lumen/exports/training-data", headers=ADMIN).json()
    assert data == [{"instruction": "How long do returns take?", "input": "", "output": "Within 7 days."}]

    from services.control_plane.models import utcnow
    from services.control_plane.store import NewRecord

    a.store.write_records(
        [
            NewRecord(
                reply_id=f"f{i}",
                tenant="lumen",
                user_hash="h",
                session_id=None,
                question=q,
                answer="Sorry.",
                sources=[],
                confidence=0.0,
                intent=None,
                outcome="fallback",
                adapter=None,
                cached=False,
                latency_ms=1.0,
                created_at=utcnow(),
            )
            for i, q in enumerate(["Do you ship to Mars?", "do you ship to mars", "Gift wrap?"])
        ]
    )
    report = a.client.get("/admin/tenants/lumen/exports/knowledge-gaps", params={"format": "csv"}, headers=ADMIN)
    assert report.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(report.text)))
    assert (rows[0]["count"], rows[0]["fallback"]) == ("2", "2")  # the two spellings are one question
    assert rows[0]["examples"] in ("Do you ship to Mars?", "do you ship to mars")
    lines = a.client.get("/admin/tenants/lumen/exports/knowledge-gaps", params={"format": "jsonl"}, headers=ADMIN)
    assert [json.loads(line)["count"] for line in lines.text.splitlines()] == [2, 1]


def test_erasing_a_shopper_removes_their_records(replicas: tuple[Replica, Replica]) -> None:
    a, _ = replicas
    mine, theirs = a.chat(SHOP, user="alice").json(), a.chat(SHOP, user="bob").json()
    until(lambda: a.store.count_records("lumen") == 2)
    erased = a.client.delete("/admin/tenants/lumen/shoppers/alice", headers=ADMIN).json()
    assert erased == {"records": 1, "feedback": 0, "reviews": 0, "sessions": 1}
    assert a.client.get(f"/admin/tenants/lumen/records/{mine['reply_id']}", headers=ADMIN).status_code == 404
    assert a.client.get(f"/admin/tenants/lumen/records/{theirs['reply_id']}", headers=ADMIN).status_code == 200


def test_a_chat_succeeds_with_the_store_gone_and_the_miss_is_counted(replicas: tuple[Replica, Replica]) -> None:
    a, _ = replicas
    schema.downgrade(a.store.engine)  # every table gone: each write fails
    assert a.chat(SHOP).status_code == 200
    until(lambda: a.metrics.tags("cs_record_misses"))
    assert a.metrics.tags("cs_record_misses") == [{"kind": "record", "reason": "store_unavailable"}]
    admin = a.client.get("/admin/tenants", headers=ADMIN)
    assert admin.status_code == 503 and admin.json()["error"]["code"] == "control_plane_unavailable"


def test_bad_admin_input_is_a_4xx_naming_the_problem(replicas: tuple[Replica, Replica]) -> None:
    a, _ = replicas
    bad_id = a.client.post("/admin/tenants", json={"tenant": "Bad Id", "persona": "p"}, headers=ADMIN)
    assert bad_id.status_code == 422 and "tenant" in bad_id.json()["error"]["message"]
    bad_regex = a.client.patch("/admin/tenants/lumen", json={"order_id_patterns": ["("]}, headers=ADMIN)
    assert bad_regex.status_code == 400 and "order_id_patterns" in bad_regex.json()["error"]["message"]
    unknown = a.client.patch("/admin/tenants/lumen", json={"colour": "red"}, headers=ADMIN)
    assert unknown.status_code == 422
    assert a.client.patch("/admin/tenants/lumen", json={}, headers=ADMIN).status_code == 400
    assert a.client.patch("/admin/tenants/lumen", json={"persona": None}, headers=ADMIN).status_code == 400
    assert a.client.post("/admin/tenants", json={"tenant": "lumen", "persona": "p"}, headers=ADMIN).status_code == 409
    assert a.client.post("/admin/keys/key_0000000000000000/rotate", headers=ADMIN).status_code == 404
    zero_for_false = a.client.patch("/admin/tenants/lumen", json={"tools": {"enabled": 0}}, headers=ADMIN)
    assert zero_for_false.status_code == 422  # a number is no boolean
    assert (
        a.client.post("/admin/keys/key_0000000000000000/rotate", json={"grace_s": False}, headers=ADMIN).status_code
        == 422
    )
    admin_for_tenant = a.client.post("/admin/keys", json={"scope": "admin", "tenant": "lumen"}, headers=ADMIN)
    assert admin_for_tenant.status_code == 400
    period = a.client.get(
        "/admin/tenants/lumen/insights", params={"start": "2026-02-01", "end": "2026-01-01"}, headers=ADMIN
    )
    assert period.status_code == 400 and "start must be before end" in period.json()["error"]["message"]


def test_a_key_cannot_revoke_or_rotate_itself(replicas: tuple[Replica, Replica]) -> None:
    a, _ = replicas
    own = next(k for k in a.client.get("/admin/keys", headers=ADMIN).json() if k["scope"] == "admin")
    revoked = a.client.delete(f"/admin/keys/{own['key_id']}", headers=ADMIN)
    assert revoked.status_code == 409 and "key of this request" in revoked.json()["error"]["message"]
    assert a.client.post(f"/admin/keys/{own['key_id']}/rotate", json={"grace_s": 0}, headers=ADMIN).status_code == 409
    other = a.client.post("/admin/keys", json={"scope": "admin"}, headers=ADMIN).json()
    assert a.client.delete(f"/admin/keys/{own['key_id']}", headers={"X-API-Key": other["key"]}).status_code == 200
    assert a.client.get("/admin/tenants", headers=ADMIN).status_code == 401


def test_a_profile_change_applies_to_the_next_chat_without_a_restart(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    strict = a.client.patch("/admin/tenants/lumen", json={"relevance_threshold": 0.95}, headers=ADMIN)
    assert strict.status_code == 200 and strict.json()["relevance_threshold"] == 0.95
    assert a.chat(SHOP).json()["outcome"] == "fallback"  # the stand-in's best hit scores 0.8
    until(lambda: b.chat(SHOP).json()["outcome"] == "fallback")


def test_the_search_test_shows_each_signal_and_the_gates_decision_and_whoami_names_the_key(
    replicas: tuple[Replica, Replica],
) -> None:
    a, _ = replicas
    found = a.client.post("/admin/tenants/lumen/search-test", json={"question": "Returns?"}, headers=ADMIN).json()
    assert found["decision"] == "answer" and found["confidence"] == 0.8
    assert found["margin"] == 0.0  # the stand-in's one candidate is its own median
    assert found["hits"][0] | {"passage": None} == {
        "doc_id": "returns", "title": "Returns", "source": "s", "passage": None, "fused": 0.03, "dense": 0.8,
        "sparse": None, "bm25": None, "rerank": None, "kept": True,
    }  # fmt: skip
    a.client.patch("/admin/tenants/lumen", json={"relevance_threshold": 0.9}, headers=ADMIN)
    strict = a.client.post("/admin/tenants/lumen/search-test", json={"question": "Returns?"}, headers=ADMIN).json()
    assert strict["decision"] == "fallback" and strict["hits"][0]["kept"] is False
    assert a.metrics.tags("cs_requests") == []  # no chat request was made, so nothing can be recorded
    assert a.client.post("/admin/tenants/lumen/search-test", json={"question": "x"}, headers=SHOP).status_code == 403
    assert a.client.post("/admin/tenants/ghost/search-test", json={"question": "x"}).status_code == 401
    assert a.client.get("/admin/whoami", headers=SHOP).json() | {"key_id": None} == {
        "key_id": None, "scope": "storefront", "tenant": "lumen",
    }  # fmt: skip
