"""The adapter registry: persistence, activation, rollback, canary, deletion rules."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from services.adapters.registry import AdapterRegistry, AdapterVersion, UnknownAdapterError, canary_bucket, now
from services.errors import ConflictError, InvalidRequestError, NotFoundError


def add_version(store: Path, name: str, version: str) -> AdapterVersion:
    (store / name / version).mkdir(parents=True)
    record = AdapterVersion(
        name=name, version=version, rank=8, target_modules=["q_proj"], base_model="m", registered_at=now()
    )
    return AdapterRegistry(store).register(record)


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    for version in ("v1", "v2", "v3"):
        add_version(tmp_path, "lumen-voice", version)
    return tmp_path


def test_state_survives_a_restart(store: Path) -> None:
    AdapterRegistry(store).activate("lumen", "lumen-voice", "v1")
    reopened = AdapterRegistry(store)  # a new process or replica reads the same file
    assert reopened.resolve("lumen", "any-session") == "lumen-voice@v1"
    assert sorted(reopened.state().adapters["lumen-voice"]) == ["v1", "v2", "v3"]
    assert json.loads((store / "registry.json").read_text())["revision"] == 4


def test_unknown_tenant_uses_the_base_model(store: Path) -> None:
    assert AdapterRegistry(store).resolve("nobody", "s") is None


def test_activate_then_rollback_restores_the_previous_version(store: Path) -> None:
    registry = AdapterRegistry(store)
    registry.activate("lumen", "lumen-voice", "v1")
    registry.activate("lumen", "lumen-voice", "v2")
    assert registry.resolve("lumen", "s") == "lumen-voice@v2"
    rolled = registry.rollback("lumen")
    assert rolled is not None and rolled.active == "v1"
    assert registry.resolve("lumen", "s") == "lumen-voice@v1"
    assert registry.rollback("lumen") is None  # the first activation undone: base model
    assert registry.resolve("lumen", "s") is None
    with pytest.raises(ConflictError, match="no adapter activation to roll back"):
        registry.rollback("lumen")


def test_reactivating_the_active_version_changes_nothing(store: Path) -> None:
    registry = AdapterRegistry(store)
    registry.activate("lumen", "lumen-voice", "v1")
    assert registry.activate("lumen", "lumen-voice", "v1").history == []


def test_unregistered_or_duplicate_versions_are_refused(store: Path) -> None:
    registry = AdapterRegistry(store)
    with pytest.raises(UnknownAdapterError, match="lumen-voice@v9 is not registered"):
        registry.activate("lumen", "lumen-voice", "v9")
    with pytest.raises(ConflictError, match="already registered"):
        registry.register(registry.state().adapters["lumen-voice"]["v1"])
    with pytest.raises(NotFoundError, match="no folder other/v1"):
        registry.register(registry.state().adapters["lumen-voice"]["v1"].model_copy(update={"name": "other"}))


def test_versions_in_use_cannot_be_deleted(store: Path) -> None:
    registry = AdapterRegistry(store)
    registry.activate("lumen", "lumen-voice", "v1")
    registry.start_canary("lumen", "v2", 10)
    for version in ("v1", "v2"):
        with pytest.raises(ConflictError, match="in use by tenant 'lumen'"):
            registry.delete("lumen-voice", version)
    registry.delete("lumen-voice", "v3")
    assert "v3" not in registry.state().adapters["lumen-voice"]


def test_deleting_a_rollback_target_drops_it_from_history(store: Path) -> None:
    registry = AdapterRegistry(store)
    registry.activate("lumen", "lumen-voice", "v1")
    registry.activate("lumen", "lumen-voice", "v2")
    registry.delete("lumen-voice", "v1")
    assert registry.rollback("lumen") is None  # v1 is gone: rolling back leaves the base model


def test_canary_split_is_sticky_and_near_the_percentage(store: Path) -> None:
    registry = AdapterRegistry(store)
    registry.activate("lumen", "lumen-voice", "v1")
    registry.start_canary("lumen", "v2", 20)
    sessions = [f"session-{n}" for n in range(2000)]
    first = [registry.resolve("lumen", s) for s in sessions]
    assert first == [registry.resolve("lumen", s) for s in sessions]  # sticky
    share = first.count("lumen-voice@v2") / len(sessions)
    assert 0.17 <= share <= 0.23
    registry.promote_canary("lumen")
    assert {registry.resolve("lumen", s) for s in sessions} == {"lumen-voice@v2"}
    rolled = registry.rollback("lumen")
    assert rolled is not None and rolled.active == "v1"


def test_canary_abort_and_invalid_canaries(store: Path) -> None:
    registry = AdapterRegistry(store)
    with pytest.raises(ConflictError, match="no active adapter"):
        registry.start_canary("lumen", "v2", 10)
    registry.activate("lumen", "lumen-voice", "v1")
    with pytest.raises(InvalidRequestError, match="already active"):
        registry.start_canary("lumen", "v1", 10)
    registry.start_canary("lumen", "v2", 50)
    registry.abort_canary("lumen")
    assert {registry.resolve("lumen", f"s{n}") for n in range(50)} == {"lumen-voice@v1"}
    with pytest.raises(ConflictError, match="no canary running"):
        registry.promote_canary("lumen")


def test_buckets_are_uniform_and_tenant_specific() -> None:
    assert 0 <= canary_bucket("a", "s") < 100
    assert canary_bucket("a", "s") != canary_bucket("b", "s")


def test_concurrent_writers_do_not_lose_updates(tmp_path: Path) -> None:
    names = [f"brand-{n}" for n in range(12)]
    for name in names:
        (tmp_path / name / "v1").mkdir(parents=True)

    def register(name: str) -> None:
        AdapterRegistry(tmp_path).register(
            AdapterVersion(
                name=name, version="v1", rank=4, target_modules=["q_proj"], base_model="m", registered_at=now()
            )
        )

    threads = [threading.Thread(target=register, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = AdapterRegistry(tmp_path).state()
    assert sorted(state.adapters) == sorted(names)
    assert state.revision == len(names)


def test_a_cs_eval_result_is_kept_with_its_version(store: Path) -> None:
    from services.adapters.registry import Evaluation

    registry = AdapterRegistry(store)
    kept = registry.record_evaluation("lumen-voice", "v1", Evaluation(passed=False, failed=["recall_at_3 0.8 < 0.9"]))
    assert kept.evaluation is not None and kept.evaluation.evaluated_at is not None
    assert AdapterRegistry(store).state().adapters["lumen-voice"]["v1"].evaluation == kept.evaluation  # on disk
    with pytest.raises(NotFoundError):
        registry.record_evaluation("lumen-voice", "v9", Evaluation(passed=True))
