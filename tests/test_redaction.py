"""Personal data is taken out of conversation records, in Chinese and in English; ordinary text is left alone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.config import ControlPlaneConfig, TenantConfig
from services.control_plane.recorder import ConversationRecorder, record_outcome
from services.control_plane.redaction import Redactor
from services.control_plane.store import NewRecord
from tests.conftest import RecordingMetrics

redact = Redactor(["email", "phone", "address", "order_id"], [r"\bVM\d{6}\b", r"\bLH-\d{4,}\b"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("我的手机是13812345678，麻烦回电", "我的手机是[phone]，麻烦回电"),
        ("电话 +86 139-1234-5678 或 021-63451234", "电话 [phone] 或 [phone]"),
        ("邮箱是 zhang.wei@example.com.cn 谢谢", "邮箱是 [email] 谢谢"),
        ("地址：上海市浦东新区世纪大道100号3栋2单元501室", "地址：[address]"),
        ("北京市朝阳区建国路88号，谢谢", "[address]，谢谢"),
        ("订单LH-1001到哪了？", "订单[order]到哪了？"),
        ("单号VM123456还没发货", "单号[order]还没发货"),
        ("Call me on (415) 555-0134 or +44 20 7946 0958.", "Call me on [phone] or [phone]."),
        ("Send it to 221B Baker Street, Apt 4 please", "Send it to [address] please"),
        ("my email is jane_doe+shop@mail.example.org", "my email is [email]"),
        ("Where is order LH-20391?", "Where is order [order]?"),
    ],
)
def test_the_configured_personal_data_is_replaced_in_both_languages(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_a_chinese_address_inside_a_sentence_is_gone_whatever_precedes_it() -> None:
    # Without word boundaries in Chinese, the match may take the words before the place name too:
    # it errs on the side of the shopper's privacy.
    redacted = redact("请寄到上海市浦东新区世纪大道100号3栋")
    assert "[address]" in redacted and "100号" not in redacted and "上海" not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "退款多久到账？7天无理由退货，运费10元。",
        "我12月3号下的单，知道3号能发货吗",
        "How many days do I have to return an item? 30 days, $4.99 shipping.",
        "Order 12345 arrived on 2024-05-01 at 10:30.",
        "两张优惠券能一起用吗",
    ],
)
def test_ordinary_questions_with_numbers_and_dates_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_only_the_configured_kinds_are_redacted() -> None:
    text = "call 13812345678 or mail a@b.cn about LH-1001"
    assert Redactor(["email"], [r"LH-\d+"])(text) == "call 13812345678 or mail [email] about LH-1001"


def test_a_reply_outcome_maps_to_the_record_outcome() -> None:
    assert record_outcome("answered", []) == "answered"
    assert record_outcome("answered", [{"type": "ticket_created"}]) == "tool"
    assert record_outcome("handover", [{"type": "handoff"}]) == "handover"
    assert record_outcome("tool_failed", []) == "error"


class StuckStore:
    """A store whose writes never return in time."""

    def write_records(self, records: list[NewRecord]) -> None:
        raise AssertionError("not reached while the queue is full")


async def test_a_full_queue_drops_the_record_and_counts_it_without_waiting() -> None:
    metrics = RecordingMetrics()
    recorder = ConversationRecorder(StuckStore(), ControlPlaneConfig(record_queue_size=1), None, metrics)  # type: ignore[arg-type]
    tenant = TenantConfig(tenant="lumen", persona="p")
    record = NewRecord(
        reply_id="r", tenant="lumen", user_hash="h", session_id=None, question="q", answer="a", sources=[],
        confidence=0.0, intent=None, outcome="answered", adapter=None, cached=False, latency_ms=1.0,
        created_at=datetime.now(UTC),
    )  # fmt: skip
    recorder._queue.append(object())  # type: ignore[arg-type]  # one waiting already: the queue is full
    recorder.record(tenant, record)
    assert metrics.tags("cs_record_misses") == [{"kind": "record", "reason": "queue_full"}]
    await asyncio.sleep(0)
    await recorder.close()


def test_an_order_id_pattern_that_does_not_compile_is_refused_naming_it() -> None:
    for bad in ("(", "a{99999999999}"):
        with pytest.raises(ValueError, match="order_id_patterns: bad pattern"):
            TenantConfig(tenant="lumen", persona="p", order_id_patterns=[bad])
