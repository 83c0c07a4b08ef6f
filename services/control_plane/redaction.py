r"""Personal data taken out of text before it is stored: e-mail, phone numbers, addresses, order ids.

The patterns cover how shoppers write these in Chinese and in English: mainland mobile
numbers with or without +86 and separators, international and North-American numbers,
street addresses ("12 Baker Street", "Apt 4B"), Chinese addresses down to the building
("上海市浦东新区世纪大道100号", "…小区3栋2单元501室"), and each tenant's own order-id
formats (``tenants[].order_id_patterns``, compiled with ``re.ASCII`` so that ``\b`` holds
between a Chinese character and a Latin one). A match is replaced by a tag such as
``[phone]``, so a record still reads as a sentence and questions still cluster.
Chinese has no word boundaries, so a Chinese address match may also take the few words
before the place name ("寄到上海市…" becomes "[address]"): it errs on the side of privacy.
What no pattern describes (a name, say) is not found: records are for the operator's
eyes, and erasing a shopper removes them whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", re.ASCII)
_PHONE = re.compile(
    r"(?<![\w])(?:"
    r"(?:\+?86[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}"  # mainland mobile: 13812345678, 138 1234 5678, +86-138-...
    r"|\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,3}"  # international: +44 20 7946 0958
    r"|\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}"  # North America: (415) 555-0134, 415-555-0134
    r"|0\d{2,3}-?\d{7,8}"  # Chinese landline: 021-12345678
    r")(?![\w])",
    re.ASCII,  # \w is [A-Za-z0-9_]: a number right after a Chinese character is still found
)
_STREET_TYPES = (
    r"Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Dr|Way|Court|Ct|Place|Pl|Square|Sq|Terrace|"
    r"Parkway|Pkwy|Highway|Hwy|Close|Crescent"
)
_ADDRESS_EN = re.compile(
    rf"\b\d{{1,6}}[A-Za-z]?\s+(?:[A-Z][\w'-]*\.?\s+){{1,4}}(?:{_STREET_TYPES})\b\.?"
    r"(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|Flat|#)\.?\s*[\w-]+)?"
    r"|\b(?:Apt|Apartment|Suite|Unit|Flat)\.?\s*#?\d+[A-Za-z]?\b",
    re.IGNORECASE | re.ASCII,
)
# A Chinese address: optional province/city/district names, then a road, street, lane or
# estate with its number, then optional building, unit and room numbers.
_CN_PLACE = r"[\u4e00-\u9fff]{1,8}?(?:省|自治区|市|区|县|镇|乡)"
_CN_ROAD = r"[\u4e00-\u9fff\w]{1,12}?(?:路|街|大道|巷|弄|胡同|小区|花园|公寓|大厦|村)"
_CN_NUMBER = r"\d{1,5}\s*(?:号|弄|栋|幢|座|单元|室|楼|层)"
_ADDRESS_ZH = re.compile(rf"(?:{_CN_PLACE}){{0,4}}{_CN_ROAD}(?:\s*{_CN_NUMBER}){{1,5}}|(?:{_CN_PLACE}){{2,4}}")

_BUILT_IN = {"email": _EMAIL, "phone": _PHONE, "address_en": _ADDRESS_EN, "address_zh": _ADDRESS_ZH}


class Redactor:
    """Replaces the configured kinds of personal data in text with tags."""

    def __init__(self, kinds: Iterable[str], order_id_patterns: Iterable[str] = ()) -> None:
        """Redact ``kinds`` (email, phone, address, order_id); order ids by ``order_id_patterns``."""
        wanted = set(kinds)
        self._steps: list[tuple[re.Pattern[str], str]] = []
        # Order ids first: "LH-1001" must not be half-read as a phone number.
        if "order_id" in wanted:
            # ASCII: \b in a tenant's pattern then works beside Chinese text ("订单LH-1001").
            self._steps += [(re.compile(p, re.ASCII), "[order]") for p in order_id_patterns]
        if "email" in wanted:
            self._steps.append((_EMAIL, "[email]"))
        if "address" in wanted:
            self._steps += [(_ADDRESS_EN, "[address]"), (_ADDRESS_ZH, "[address]")]
        if "phone" in wanted:
            self._steps.append((_PHONE, "[phone]"))

    def __call__(self, text: str) -> str:
        """``text`` with every match replaced by its tag."""
        for pattern, tag in self._steps:
            text = pattern.sub(tag, text)
        return text
