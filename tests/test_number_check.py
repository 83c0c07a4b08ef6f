"""The model-independent check of an answer's numbers against what the model was shown."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.chat.number_check import NumberGuard, allowed_numbers, numbers_in, unsupported_numbers

ENTRY = "Returns: most items within 7 days of delivery; refunds in 3-5 business days. Shipping is free over ¥1,299.00."
ENTRY_ZH = "七天无理由退货；退款三到五个工作日原路退回；满两百元包邮；客服热线每天二十四小时。"


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("within 7 days, 3-5 business days, ¥1,299.00", {7, 3, 5, 1299}),
        ("七天，三到五个工作日，两百元，二十四小时，十五", {7, 3, 5, 200, 24, 15}),
        ("seven days or twelve hours", {7, 12}),
        ("3.5 kg", {Decimal("3.5")}),
        ("一些商品可以一起退，统一处理，唯一的要求", set()),  # no quantities, only idioms
    ],
)
def test_numbers_are_read_as_values_in_both_languages(text: str, values: set[int | Decimal]) -> None:
    assert numbers_in(text) == {Decimal(v) for v in values}


def test_a_number_from_the_entries_in_either_language_is_supported() -> None:
    allowed = allowed_numbers([ENTRY, ENTRY_ZH])
    assert unsupported_numbers("You can return items within 7 days; refunds take three to five days.", allowed) == []
    assert unsupported_numbers("退款需要3到5个工作日，订单满1299元包邮。", allowed) == []
    assert unsupported_numbers("We have one store and 一个客服团队.", allowed) == []  # "a": always allowed


def test_invented_numbers_are_named() -> None:
    allowed = allowed_numbers([ENTRY])
    assert unsupported_numbers("Call 400-820-1234 within 30 days.", allowed) == ["400", "820", "1234", "30"]
    assert unsupported_numbers("退货期为十五天。", allowed) == ["十五"]


def test_the_guard_releases_checked_sentences_and_never_shows_an_invented_number() -> None:
    guard = NumberGuard([ENTRY])
    assert guard.feed("Returns are accepted within 7 ") == ("", [])  # the sentence is not complete
    assert guard.feed("days. Refunds take 3.") == ("Returns are accepted within 7 days.", [])
    # "3." was not taken for the end of a sentence: the number may still grow.
    assert guard.feed("5 days. Or call 800-") == ("", ["3.5"])
    guard = NumberGuard([ENTRY_ZH])
    assert guard.feed("您好！七天内可以退货。") == ("您好！七天内可以退货。", [])
    assert guard.feed("运费十") == ("", [])
    assert guard.flush() == ("", ["十"])


def test_the_end_of_the_stream_is_judged_too() -> None:
    guard = NumberGuard([ENTRY])
    assert guard.feed("Refunds take 3 to 5 business days") == ("", [])
    assert guard.flush() == ("Refunds take 3 to 5 business days", [])
