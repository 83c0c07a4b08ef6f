"""Structured replies: the model writes ``{"response": ..., "confidence": ...}`` under a JSON schema.

vLLM's structured output makes even a small model's reply valid JSON with the fields in
schema order, so the response text can still be streamed: :class:`ReplyStreamDecoder`
pulls the characters of the ``response`` string out of the JSON as it grows, and reads
the model's confidence once the object is complete.
"""

from __future__ import annotations

import json
import re

from services.schemas import ChatMessage


def reply_schema(max_chars: int, entries: int = 0) -> dict[str, object]:
    """The reply object's JSON schema; ``max_chars`` bounds the response so the object can close in budget.

    With ``entries`` knowledge entries shown, the object starts with ``cited``: the numbers
    of the entries the reply rests on, only numbers that were shown (so a citation can never
    name an entry the model did not see). It comes first so the pipeline knows, before any
    text is streamed, whether the reply rests on the knowledge at all.
    """
    properties: dict[str, object] = {}
    if entries:
        entry = {"type": "integer", "minimum": 1, "maximum": entries}
        properties["cited"] = {"type": "array", "items": entry, "maxItems": entries}
    properties["response"] = {"type": "string", "maxLength": max_chars}
    properties["confidence"] = {"type": "number", "minimum": 0, "maximum": 1}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


CHARS_PER_TOKEN = 3
"""Response characters allowed per token of max_tokens: about what English takes (Chinese takes fewer)."""

# "As a full sentence": without it the 0.5B dev model often answers with a bare value or an
# entry's title ("7", "退款到账时间"); with it, "You can return most items within 7 days of
# delivery ..." (docs/evaluation.md).
REPLY_INSTRUCTION = (
    'Reply with a JSON object {"response": <your reply to the customer, as a full sentence in the customer\'s '
    'language>, "confidence": <0 to 1, how sure you are that the knowledge entries support your reply>}.'
)
CITING_REPLY_INSTRUCTION = (
    'Reply with a JSON object {"cited": [numbers of the entries that answer the question; [] if none does], '
    '"response": <your reply to the customer, as a full sentence in the customer\'s language, using only those '
    'entries>, "confidence": <0 to 1>}.'
)


def with_reply_instruction(messages: list[ChatMessage], *, cite: bool = False) -> list[ChatMessage]:
    """The messages with the reply instruction (the citing one, when entries must be cited) after the system message."""
    instruction = CITING_REPLY_INSTRUCTION if cite else REPLY_INSTRUCTION
    system = ChatMessage(role="system", content=f"{messages[0].content}\n\n{instruction}")
    return [system, *messages[1:]]


def reply_json(response: str, confidence: float) -> str:
    """A reply object exactly as the engine writes it under the schema: compact JSON, fields in order."""
    return json.dumps({"response": response, "confidence": confidence}, ensure_ascii=False, separators=(",", ":"))


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_START = re.compile(r'"response"\s*:\s*"')
_CITED = re.compile(r'"cited"\s*:\s*\[([^\]]*)\]')


def combined_confidence(evidence: float, model: float | None) -> float:
    """Confidence that reaches the caller: the retrieval evidence, lowered when the model is unsure.

    The model can halve the evidence but never raise it: a reply is never surer than the
    policy it rests on.
    """
    if model is None:
        return evidence
    return round(evidence * (0.5 + 0.5 * min(max(model, 0.0), 1.0)), 4)


class ReplyStreamDecoder:
    """Feeds on the JSON text as it is generated; yields the decoded ``response`` characters."""

    def __init__(self) -> None:
        self._raw = ""
        self._pos: int | None = None  # where the response string's content starts, once seen
        self._done = False

    def feed(self, piece: str) -> str:
        """Add generated text; return the newly decoded part of the response string."""
        self._raw += piece
        if self._pos is None:
            match = _START.search(self._raw)
            if match is None:
                return ""
            self._pos = match.end()
        out = []
        i = self._pos
        while i < len(self._raw) and not self._done:
            char = self._raw[i]
            if char == '"':
                self._done = True
                i += 1
                break
            if char != "\\":
                out.append(char)
                i += 1
                continue
            if i + 1 >= len(self._raw):
                break  # an escape split across pieces: wait for the rest
            code = self._raw[i + 1]
            if code == "u":
                if i + 6 > len(self._raw):
                    break
                point = int(self._raw[i + 2 : i + 6], 16)
                if 0xD800 <= point < 0xDC00:  # a surrogate pair: the low half follows
                    if i + 12 > len(self._raw):
                        break
                    low = int(self._raw[i + 8 : i + 12], 16)
                    point = 0x10000 + ((point - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
                out.append(chr(point))
                i += 6
            else:
                out.append(_ESCAPES.get(code, code))
                i += 2
        self._pos = i
        return "".join(out)

    def cited(self) -> list[int] | None:
        """The entry numbers the reply cites, once their list is complete (None before, or without one)."""
        match = _CITED.search(self._raw)
        if match is None:
            return None
        return [int(n) for n in re.findall(r"-?\d+", match.group(1))]

    def model_confidence(self) -> float | None:
        """The model's confidence, once the whole object has been fed (None if unreadable)."""
        try:
            value = json.loads(self._raw, strict=False).get("confidence")
        except (ValueError, AttributeError):
            return None
        return float(value) if isinstance(value, int | float) else None
