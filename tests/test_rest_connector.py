"""The REST connector against a local emulated CRM: paging, auth, retries, rejects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cs_testing.cluster import free_port
from cs_testing.crm_emulator import CrmState, create_crm_app, serve_in_thread
from knowledge_sync.connectors import SourceAuthError, SourceError
from knowledge_sync.connectors.rest import RestConnector
from knowledge_sync.records import RecordMapper, html_to_text
from knowledge_sync.sources import RestSource, SourcesFileError


@pytest.fixture(scope="module")
def crm() -> Iterator[tuple[str, CrmState]]:
    state = CrmState()
    with serve_in_thread(create_crm_app(state)) as url:
        yield url, state


@pytest.fixture()
def state(crm: tuple[str, CrmState], monkeypatch: pytest.MonkeyPatch) -> CrmState:
    _, state = crm
    state.records, state.fail_next, state.slow_next, state.requests = [], 0, 0, 0
    for i in range(23):
        state.put(f"p{i}", f"Policy {i}", f"Rule number {i}.")
    monkeypatch.setenv("CRM_TOKEN", state.token)
    return state


def source(url: str, **overrides: Any) -> RestSource:
    config: dict[str, Any] = {
        "name": "crm",
        "type": "rest",
        "url": f"{url}/api/policies",
        "auth": {"type": "bearer", "token_env": "CRM_TOKEN"},
        "pagination": {"style": "cursor", "cursor_param": "cursor", "next_cursor_path": "meta.next_cursor"},
        "records_path": "data",
        "updated_since_param": "updated_since",
        "fields": {"doc_id": "id", "title": "name", "text": "content.body", "updated_at": "modified"},
        "deleted": {"path": "status", "values": ["archived"]},
        "backoff_s": 0,
    }
    return RestSource.model_validate(config | overrides)


@pytest.mark.parametrize(
    "pagination",
    [
        {"style": "cursor", "cursor_param": "cursor", "next_cursor_path": "meta.next_cursor"},
        {"style": "page", "page_param": "page", "size_param": "page_size", "page_size": 5},
        {"style": "offset", "offset_param": "offset", "limit_param": "limit", "limit": 7},
    ],
)
def test_every_pagination_style_reads_every_record_once(
    crm: tuple[str, CrmState], state: CrmState, pagination: dict[str, Any]
) -> None:
    config = source(crm[0], pagination=pagination, params={"limit": "6"})  # the cursor style's page size
    records = list(RestConnector(config).pull(None))
    assert [r["id"] for r in records] == [f"p{i}" for i in range(23)]
    assert state.requests > 1


def test_incremental_pull_asks_only_for_changes(crm: tuple[str, CrmState], state: CrmState) -> None:
    connector = RestConnector(source(crm[0]))
    mapper = RecordMapper("lumen", source(crm[0]), cursor_path=connector.cursor_path)
    for record in connector.pull(None):
        mapper.add(record)
    cursor = mapper.batch(complete=True).cursor
    assert cursor == state.records[-1]["modified"]
    state.put("p3", "Policy 3", "Rule three, revised.")
    changed = [r["id"] for r in connector.pull(cursor)]
    assert changed == ["p22", "p3"]  # inclusive: the last one seen comes again, harmlessly


def test_a_burst_of_503s_is_retried(crm: tuple[str, CrmState], state: CrmState) -> None:
    state.fail_next = 3
    records = list(RestConnector(source(crm[0], max_attempts=5)).pull(None))
    assert len(records) == 23
    assert state.requests == 3 + 1  # three failures, then one page of 50


def test_a_timeout_is_retried(crm: tuple[str, CrmState], state: CrmState) -> None:
    state.slow_next, state.slow_s = 1, 1.0
    records = list(RestConnector(source(crm[0], timeout_s=0.2, max_attempts=3)).pull(None))
    assert len(records) == 23 and state.requests == 2


def test_too_many_failures_fail_the_source_with_the_status(crm: tuple[str, CrmState], state: CrmState) -> None:
    state.fail_next = 10
    with pytest.raises(SourceError, match=r"answered 503 \(after 2 tries\)"):
        list(RestConnector(source(crm[0], max_attempts=2)).pull(None))


def test_a_wrong_token_fails_at_once_and_clearly(
    crm: tuple[str, CrmState], state: CrmState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRM_TOKEN", "stale")
    with pytest.raises(SourceAuthError, match="refused the credentials \\(401\\)"):
        list(RestConnector(source(crm[0])).pull(None))
    assert state.requests == 1  # no retries on 401


def test_a_missing_secret_is_named(crm: tuple[str, CrmState], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRM_TOKEN", raising=False)
    with pytest.raises(SourcesFileError, match="environment variable CRM_TOKEN is not set"):
        RestConnector(source(crm[0]))


def test_an_unreachable_server_is_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_TOKEN", "t")
    config = source(f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(SourceError, match=r"unreachable.*after 2 tries"):
        list(RestConnector(config).pull(None))


def test_malformed_records_are_rejected_and_the_rest_kept(crm: tuple[str, CrmState], state: CrmState) -> None:
    state.records.append({"id": "broken", "name": "No body"})
    state.records.append({"id": "", "name": "Empty id", "content": {"body": "x"}})
    state.put("p5", "Policy 5", "Rule five.", status="archived")
    state.put(
        "p6", "退货" * 200, "标题过长的一条。"
    )  # an edit to 400 characters, 1,200 bytes: more than the store holds
    config = source(crm[0])
    connector = RestConnector(config)
    mapper = RecordMapper("lumen", config, cursor_path=connector.cursor_path)
    for record in connector.pull(None):
        mapper.add(record)
    mapper.add(["not", "an", "object"])
    batch = mapper.batch(complete=True)
    assert len(batch.documents) == 21 and batch.deleted_doc_ids == ["p5"]
    assert batch.rejected == len(mapper.rejects)  # sent along: the source's state keeps the last run's count
    reasons = {(r.doc_id, r.reason) for r in mapper.rejects}
    assert ("broken", "text: Field required") in reasons
    assert any(r.reason.startswith("doc_id:") for r in mapper.rejects)
    assert any(r.reason == "expected an object, got list" for r in mapper.rejects)
    assert ("p6", "title: is 1200 bytes in UTF-8; the store holds at most 1024 (a Chinese character is 3)") in reasons
    assert batch.kept_doc_ids == ["broken", "p6"]  # their stored versions stay


def test_html_bodies_become_text_with_sections() -> None:
    text = html_to_text(
        "<h2>Returns</h2><p>Within <b>7</b> days.</p><ul><li>Unused</li><li>Boxed</li></ul><script>alert(1)</script>"
    )
    assert "## Returns" in text and "Within 7 days." in text and "- Unused" in text and "alert" not in text
