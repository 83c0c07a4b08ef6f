"""Config of intent and frustration detection, and the replies given without the model."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.config.base import StrictModel, check_patterns, defaults


class IntentConfig(StrictModel):
    """Intent and frustration detection: rules, then similarity to example messages."""

    examples: dict[str, list[str]] = Field(
        default_factory=lambda: defaults("intents")["examples"],
        description="Example messages per intent (order_status, complaint, human_agent, chit_chat, out_of_scope, "
        "sensitive); a message most similar to one of them, above threshold, has that intent.",
    )
    rules: dict[str, list[str]] = Field(
        default_factory=lambda: defaults("intents")["rules"],
        description="Regular expressions per intent, checked before examples (in this order); exact in any language.",
    )
    threshold: float = Field(0.75, ge=0, le=1, description="Least similarity to an example for its intent.")
    angry_words: list[str] = Field(
        default_factory=lambda: defaults("intents")["angry_words"], description="Anger signals."
    )
    repeat_phrases: list[str] = Field(
        default_factory=lambda: defaults("intents")["repeat_phrases"],
        description='Regular expressions of a shopper saying they asked before ("third time", 第三次): a signal.',
    )
    shouting_words: int = Field(
        2, ge=1, description="Words of four or more capital letters in one message that count as shouting (a signal)."
    )
    repeat_similarity: float = Field(
        0.9, gt=0, le=1, description="A message this similar (characters) to an earlier one is a repeated question."
    )
    frustration_handoff: int = Field(
        2, ge=1, description="Frustration signals in one message that hand the conversation to a human."
    )

    @model_validator(mode="after")
    def _known_intents(self) -> IntentConfig:
        known = {"order_status", "complaint", "human_agent", "chit_chat", "out_of_scope", "sensitive"}
        unknown = (set(self.examples) | set(self.rules)) - known
        if unknown:
            raise ValueError(f"unknown intents {sorted(unknown)}; use {sorted(known)}")
        for intent, patterns in self.rules.items():
            check_patterns(patterns, f"rules.{intent}")
        check_patterns(self.repeat_phrases, "repeat_phrases")
        return self


class StandardReplies(StrictModel):
    """Replies given without the model: for handover, sensitive topics and out-of-scope requests.

    The defaults are bilingual (``defaults/standard_replies.yaml``); a tenant may override them.
    """

    handoff: str = Field(
        default_factory=lambda: defaults("standard_replies")["handoff"],
        description="Sent when the conversation is handed to a human.",
    )
    sensitive: str = Field(
        default_factory=lambda: defaults("standard_replies")["sensitive"],
        description="Sent for configured sensitive topics.",
    )
    out_of_scope: str = Field(
        default_factory=lambda: defaults("standard_replies")["out_of_scope"],
        description="Sent for requests outside customer service.",
    )
    tool_failure: str = Field(
        default_factory=lambda: defaults("standard_replies")["tool_failure"],
        description="Sent when a tool the answer needs fails.",
    )
