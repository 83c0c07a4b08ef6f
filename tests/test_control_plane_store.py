"""The control-plane store on a real PostgreSQL server (started by the tests) and on a SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect

from services.config import TenantConfig
from services.control_plane import insights, schema
from services.control_plane.directory import TenantDirectory, seed_keys
from services.control_plane.store import ControlPlaneStore, KeyScope, NewRecord
from services.errors import ConflictError, NotFoundError
from services.security import key_digest, shopper_hash
from tests.postgres_server import postgres_server

TABLES = {"tenants", "api_keys", "control_revision", "conversation_records", "feedback", "reviews"}


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ControlPlaneStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control-plane.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = ControlPlaneStore(url)
    schema.downgrade(store.engine) if schema.current_revision(store.engine) else None  # a clean server each test
    store.migrate()
    yield store
    schema.downgrade(store.engine)
    store.close()


def lumen(**changes: object) -> TenantConfig:
    return TenantConfig.model_validate({"tenant": "lumen", "persona": "You are Lumen's assistant."} | changes)


def record(
    reply_id: str, *, outcome: str = "answered", user: str = "u1", question: str = "q", at: datetime
) -> NewRecord:
    return NewRecord(
        reply_id=reply_id, tenant="lumen", user_hash=shopper_hash("lumen", user, None), session_id=f"s-{user}",
        question=question, answer="a", sources=[], confidence=0.5, intent=None, outcome=outcome, adapter=None,
        cached=False, latency_ms=10.0, created_at=at,
    )  # fmt: skip


def test_migrations_go_up_from_empty_and_down_to_nothing(store: ControlPlaneStore) -> None:
    assert set(inspect(store.engine).get_table_names()) >= TABLES
    assert schema.current_revision(store.engine) == "0001"
    schema.downgrade(store.engine)
    assert not TABLES & set(inspect(store.engine).get_table_names())
    assert schema.current_revision(store.engine) is None
    store.migrate()  # and up again over the emptied database
    assert store.revision() == 0


def test_the_config_seed_is_imported_once_and_its_removed_keys_are_revoked(store: ControlPlaneStore) -> None:
    tenants = [lumen(api_keys=["shop-key"])]
    store.seed(tenants, seed_keys(tenants, ["admin"], {}))
    snapshot = store.snapshot()
    assert snapshot.tenants["lumen"].persona == "You are Lumen's assistant."
    assert {g.scope for g in snapshot.keys.values()} == {KeyScope.STOREFRONT, KeyScope.ADMIN}
    first = snapshot.revision
    store.seed(tenants, seed_keys(tenants, ["admin"], {}))
    assert store.revision() == first  # nothing changed, nothing bumped
    store.seed([lumen(persona="New voice.")], seed_keys([lumen()], ["admin"], {}))
    snapshot = store.snapshot()
    assert snapshot.tenants["lumen"].persona == "New voice."  # the config still owns it
    assert key_digest("shop-key") not in snapshot.keys  # removed from the config: revoked


def test_a_tenant_changed_through_the_api_is_no_longer_overridden_by_the_seed(store: ControlPlaneStore) -> None:
    store.seed([lumen()], {})
    store.update_tenant("lumen", {"persona": "Set by the operator.", "relevance_threshold": 0.7})
    store.seed([lumen(persona="From the file.")], {})
    assert store.tenant("lumen").persona == "Set by the operator."
    assert store.tenant("lumen").relevance_threshold == 0.7
    with pytest.raises(NotFoundError):
        store.update_tenant("ghost", {"persona": "x"})
    with pytest.raises(ConflictError):
        store.create_tenant(lumen())


def test_a_rotated_key_works_until_its_grace_ends_and_a_revoked_one_stops_at_once(store: ControlPlaneStore) -> None:
    store.create_tenant(lumen())
    old = store.issue_key(KeyScope.STOREFRONT, "lumen", "web shop")
    new = store.rotate_key(old.info["key_id"], grace_s=60)
    directory = TenantDirectory([], {}, store)
    directory.load()
    now = datetime.now(UTC)
    assert directory.grant(old.key, now) is not None and directory.grant(new.key, now) is not None
    assert directory.grant(old.key, now + timedelta(seconds=61)) is None  # grace over
    with pytest.raises(ConflictError):
        store.rotate_key(old.info["key_id"], grace_s=60)  # rotated already
    store.revoke_key(new.info["key_id"])
    directory.load()
    assert directory.grant(new.key, now) is None
    listed = {k["key_id"]: k for k in store.keys("lumen")}
    assert listed[old.info["key_id"]]["replaced_by"] == new.info["key_id"]
    assert listed[new.info["key_id"]]["revoked_at"] is not None
    assert all("digest" not in k and new.key not in str(k) for k in listed.values())


def test_an_admin_key_has_no_tenant_and_a_tenant_key_needs_one(store: ControlPlaneStore) -> None:
    store.create_tenant(lumen())
    with pytest.raises(ValueError, match="admin key belongs to no tenant"):
        store.issue_key(KeyScope.ADMIN, "lumen")
    with pytest.raises(ValueError):
        store.issue_key(KeyScope.OPERATOR, None)
    with pytest.raises(NotFoundError):
        store.issue_key(KeyScope.OPERATOR, "ghost")
    assert store.issue_key(KeyScope.ADMIN, None).info["tenant"] is None


def test_last_use_is_recorded(store: ControlPlaneStore) -> None:
    store.create_tenant(lumen())
    issued = store.issue_key(KeyScope.OPERATOR, "lumen")
    at = datetime(2026, 1, 2, tzinfo=UTC)
    store.touch_keys({issued.info["key_id"]: at})
    assert store.key(issued.info["key_id"])["last_used_at"] == at.isoformat()


def test_erasing_a_shopper_removes_their_records_feedback_and_reviews_only(store: ControlPlaneStore) -> None:
    now = datetime.now(UTC)
    store.write_records([record("r1", user="alice", at=now), record("r2", user="bob", at=now)])
    store.add_feedback("lumen", "r1", shopper_hash("lumen", "alice", None), False, None)
    store.review("lumen", "r1", "corrected", "Better answer.", None)
    erased = store.erase_shopper("lumen", shopper_hash("lumen", "alice", None))
    assert erased == {"records": 1, "feedback": 1, "reviews": 1, "sessions": ["s-alice"]}
    assert store.count_records("lumen") == 1 and store.record("lumen", "r2")["reply_id"] == "r2"
    with pytest.raises(NotFoundError):
        store.record("lumen", "r1")


def test_purge_applies_each_tenants_retention(store: ControlPlaneStore) -> None:
    store.create_tenant(lumen(retention_days=10))
    now = datetime.now(UTC)
    store.write_records([record("old", at=now - timedelta(days=11)), record("new", at=now - timedelta(days=9))])
    assert store.purge(now, default_days=90) == {"lumen": 1}
    assert store.count_records("lumen") == 1


def test_insights_count_rates_and_cluster_unanswered_questions(store: ControlPlaneStore) -> None:
    now = datetime.now(UTC)
    store.write_records(
        [record("a1", at=now), record("a2", at=now), record("h1", outcome="handover", at=now)]
        + [record(f"f{i}", outcome="fallback", question="Do you ship to Mars?", at=now) for i in range(3)]
        + [record("g1", outcome="fallback", question="Gift wrapping?", at=now)]
    )
    store.add_feedback("lumen", "a1", "x", True, True)
    store.add_feedback("lumen", "a2", "y", False, False)
    with store.session() as session:
        rates = insights.rates(session, "lumen", now - timedelta(days=1), now + timedelta(days=1))
        clusters = insights.unanswered_clusters(
            session, "lumen", now - timedelta(days=1), now + timedelta(days=1), similarity=0.9
        )
        worst = insights.worst_rated(session, "lumen", now - timedelta(days=1), now + timedelta(days=1))
    assert (
        rates["replies"] == 7
        and rates["fallback_rate"] == round(4 / 7, 4)
        and rates["handover_rate"] == round(1 / 7, 4)
    )
    assert rates["satisfaction"] == 0.5 and rates["resolution_rate"] == 0.5
    assert (clusters[0].count, clusters[0].examples, clusters[0].outcomes) == (
        3,
        ["Do you ship to Mars?"],
        {"fallback": 3},
    )
    assert {c.examples[0] for c in clusters[1:]} == {"Gift wrapping?", "q"}  # the handover's question counts too
    assert [w["reply_id"] for w in worst] == ["a2"]


def test_the_migrations_build_exactly_the_models_schema(store: ControlPlaneStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.control_plane.models import Base

    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
