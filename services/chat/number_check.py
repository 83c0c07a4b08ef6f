"""A model-independent check of an answer's numbers against what the model was shown.

A customer-service answer that states a number (a price, a fee, a number of days, a phone
number, an order total) must have it from somewhere: a knowledge entry, the shopper's own
words, or the conversation before. Invented numbers are the most harmful kind of invented
fact, and they are easy to find without a second model: every number in the answer must
be among the numbers of what it may rest on. Arabic digits, Chinese numerals (七天, 十五,
两百) and English number words up to twenty are read as values, so "7 days" in an English
answer is supported by "七天" in a Chinese entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal

# Digits with thousands separators and decimals: 1,299.00 / 3.5 / 48.
_DIGITS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d+(?:\.\d+)?")
_CJK_DIGITS = {
    "零": 0,
    "〇": 0,
    "一": 1,
    "二": 2,
    "两": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}
_CJK_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10_000}
_CJK_NUMERAL = re.compile(f"[{''.join(_CJK_DIGITS)}{''.join(_CJK_UNITS)}]+")
_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "hundred": 100,
}  # fmt: skip
_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)
# Chinese words that hold a numeral but state no quantity: 一些 (some), 一起 (together), 一下 ...
_CJK_IDIOMS = re.compile(r"一(些|起|下|直|定|般|切|样|旦|点|致|律|经|共|次性)|万一|不一|统一|唯一|之一|第一时间|十分")


def _cjk_value(numeral: str) -> int:
    """The value of a Chinese numeral such as 七, 十五, 二十四, 两百, 三千五百, 两万, or digit by digit 二〇二六."""
    if all(c in _CJK_DIGITS for c in numeral):
        return int("".join(str(_CJK_DIGITS[c]) for c in numeral))
    total, current = 0, 0
    for char in numeral:
        if char in _CJK_DIGITS:
            current = _CJK_DIGITS[char]
            continue
        unit = _CJK_UNITS[char]
        if unit == 10_000:  # 万 multiplies everything before it
            total = (total + current) * unit
        else:
            total += (current or 1) * unit  # 十五: a unit without a digit counts once
        current = 0
    return total + current


def _mentions(text: str) -> list[tuple[str, Decimal]]:
    """Each number stated in a text, as written and as a value, in reading order by kind."""
    found = [(m.group(), Decimal(m.group().replace(",", ""))) for m in _DIGITS.finditer(text)]
    found += [(m.group(), Decimal(_cjk_value(m.group()))) for m in _CJK_NUMERAL.finditer(_CJK_IDIOMS.sub(" ", text))]
    found += [(m.group(), Decimal(_WORDS[m.group().lower()])) for m in _WORD.finditer(text)]
    return [(written, value.normalize()) for written, value in found]


def numbers_in(text: str) -> set[Decimal]:
    """Every number stated in a text, as values (digits, Chinese numerals, English number words)."""
    return {value for _, value in _mentions(text)}


def allowed_numbers(evidence: Iterable[str]) -> set[Decimal]:
    """The numbers an answer may state: those of the evidence texts, and 1.

    1 (一, one) is how both languages say "a" ("一个订单", "one order"), so it is always allowed.
    """
    allowed = {Decimal(1)}
    for text in evidence:
        allowed |= numbers_in(text)
    return allowed


def unsupported_numbers(answer: str, allowed: set[Decimal]) -> list[str]:
    """The numbers stated in ``answer`` that are not ``allowed``, as written, in the answer's order."""
    return list(dict.fromkeys(written for written, value in _mentions(answer) if value not in allowed))


# A sentence ends at CJK end punctuation, a newline, or ASCII end punctuation before a space
# (not at "3." of "3.5", which may still be growing).
_SENTENCE_END = re.compile(r"[。！？；\n]|[.!?;](?=\s)")


class NumberGuard:
    """Releases a streamed answer sentence by sentence, each once its numbers are checked.

    A sentence is complete before it is judged, so a number is never cut in two ("3." and
    "5 days") and nothing unsupported is ever shown: the stream stops at the first sentence
    that states a number the evidence does not hold.
    """

    def __init__(self, evidence: Iterable[str] | None) -> None:
        """Check against the numbers of ``evidence``.

        With None, numbers are not checked: only the first sentence is held (so that the
        reply's form can be judged before anything is shown), then text passes as it comes.
        """
        self._allowed = allowed_numbers(evidence) if evidence is not None else None
        self._held = ""
        self._released = False

    def feed(self, text: str) -> tuple[str, list[str]]:
        """Add streamed text; return the complete sentences now safe to show, or the numbers that are not."""
        if self._allowed is None and self._released:
            text, self._held = self._held + text, ""
            return text, []
        self._held += text
        ends = [m.end() for m in _SENTENCE_END.finditer(self._held)]
        if not ends:
            return "", []
        ready, self._held = self._held[: ends[-1]], self._held[ends[-1] :]
        return self._judged(ready)

    def flush(self, *, drop_unfinished: bool = False) -> tuple[str, list[str]]:
        """The rest of the answer once the stream has ended, judged the same way.

        Args:
            drop_unfinished: The stream was cut off (token budget): the sentence it was
                writing is dropped rather than shown unfinished.

        """
        ready, self._held = ("" if drop_unfinished else self._held), ""
        return self._judged(ready)

    def _judged(self, text: str) -> tuple[str, list[str]]:
        self._released = self._released or bool(text)
        if self._allowed is None:
            return text, []
        bad = unsupported_numbers(text, self._allowed)
        return ("", bad) if bad else (text, [])
