"""The chat's request and reply contracts: what the pipeline, the answer cache and the API exchange."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
UserId = Annotated[str, Field(min_length=1, max_length=128, description="The storefront's id of the shopper.")]


class ChatRequest(BaseModel):
    """A shopper's message. The tenant comes from the API key, never from the body."""

    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=SESSION_ID_PATTERN,
        description="Conversation id, as issued by the server to this user (a reply's session_id, or POST "
        "/v1/sessions); omit it to start a new conversation. An id not issued to this user is a 404.",
    )
    user_id: UserId
    # The schema states "not blank" (a pattern); the validator says it in words.
    message: str = Field(json_schema_extra={"pattern": r"\S"}, description="The shopper's message (not blank).")
    stream: bool = Field(False, strict=True, description="Answer as Server-Sent Events instead of one JSON body.")

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message must not be empty")
        return value.strip()


class Source(BaseModel):
    """A knowledge document the answer is based on."""

    doc_id: str
    title: str
    score: float = Field(description="Dense similarity of the document's best chunk to the question (0..1).")


class Usage(BaseModel):
    """Tokens the engine read and wrote for a reply."""

    prompt_tokens: int
    completion_tokens: int


class ChatReply(BaseModel):
    """The answer to one message."""

    reply_id: str = Field("", description="Id of this reply, for POST /v1/feedback.")
    response: str
    confidence: float = Field(ge=0, le=1, description="0 when the knowledge base held nothing relevant.")
    sources: list[Source]
    actions: list[dict[str, Any]] = Field(default_factory=list, description="Actions taken (tickets, handover).")
    cited: list[str] | None = Field(
        None,
        description="doc_ids of the sources the answer rests on, as the model cited them; null where no citation "
        "applies (no knowledge entries were shown, or replies are plain text).",
    )
    session_id: str
    adapter: str | None = Field(None, description="LoRA adapter that voiced the answer; null for the base model.")
    usage: Usage | None = Field(None, description="Engine tokens; null when no model was called (fallback).")
    cached: bool = Field(False, description="Served from the answer cache.")
    intent: str | None = Field(
        None,
        description="policy_question, order_status, complaint, human_agent, chit_chat, out_of_scope or sensitive.",
    )
    outcome: str = Field(
        "answered",
        description="How the request was answered: answered, fallback (the knowledge base has nothing), handover, "
        "guardrail (sensitive or out of scope) or tool_failed.",
    )
    finish_reason: str = Field(
        "stop",
        description="How generation ended: 'stop' (complete; also for replies given without the model) or 'length' "
        "(the token budget cut it short).",
    )


class FeedbackRequest(BaseModel):
    """The shopper's verdict on one reply."""

    # The schema states the rule the validator enforces: at least one verdict, not null.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["helpful"], "properties": {"helpful": {"type": "boolean"}}},
                {"required": ["resolved"], "properties": {"resolved": {"type": "boolean"}}},
            ]
        },
    )

    session_id: str = Field(min_length=1, max_length=128, pattern=SESSION_ID_PATTERN)
    user_id: UserId
    reply_id: str = Field(min_length=1, max_length=64)
    helpful: bool | None = Field(None, strict=True, description="Was the answer helpful (accurate)?")
    resolved: bool | None = Field(None, strict=True, description="Was the shopper's issue resolved?")
    comment: str | None = Field(None, max_length=1000)

    @model_validator(mode="after")
    def _some_verdict(self) -> FeedbackRequest:
        if self.helpful is None and self.resolved is None:
            raise ValueError("give helpful, resolved or both")
        return self


class SessionRequest(BaseModel):
    """Open a conversation for a shopper before its first message."""

    model_config = ConfigDict(extra="forbid")

    user_id: UserId


class SessionReply(BaseModel):
    """A new conversation's id, issued to one shopper of the caller's tenant."""

    session_id: str
    user_id: str
