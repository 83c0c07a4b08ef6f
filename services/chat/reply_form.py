"""Whether a generated reply has the form of an answer: a sentence, in the shopper's language.

Small models under a JSON schema sometimes fill the response with a bare value ("7",
"Yes"), the title of the entry they read ("退款到账时间"), or a reply in the language of
the persona rather than the shopper's. None of these is an answer a shopper can use, and
all are plain to see without a second model. The pipeline asks once more, in plain text
(:func:`retry_messages`); a second misfit is withheld like any other unusable reply.
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from services.chat.grounding import HAN, LATIN_WORD, written_in
from services.schemas import ChatMessage

Misfit = Literal["fragment", "wrong_language"]

# Fewer than these is not an answer: "Yes", "7 days", "可以", "7天" (a title such as "退款到账时间" is
# caught by comparison with the entries' titles).
MIN_ENGLISH_WORDS = 2
MIN_HAN_CHARS = 3


def _bare(text: str) -> str:
    """Letters, digits and Han characters only, case-folded: how a title is compared."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def misfit(
    response: str, question: str, titles: list[str], *, from_entries: bool, complete: bool = True
) -> Misfit | None:
    """Why a reply is not an answer to show, or None when it is.

    Args:
        response: The reply's text.
        question: The shopper's message (its language is the reply's).
        titles: Titles of the knowledge entries the model was shown.
        from_entries: The reply should answer from those entries: then a bare value or a
            title is a fragment (a greeting's "您好！" is not judged so).
        complete: The reply is whole; its first sentences alone are judged only by language.

    """
    bare = _bare(response)
    if not bare:
        return None  # no text at all: undecodable, not a form to retry
    if (language := written_in(question)) is not None and not _in_language(response, language):
        return "wrong_language"
    if not from_entries or not complete:
        return None
    if bare in {_bare(t) for t in titles}:
        return "fragment"
    han = len(HAN.findall(response))
    words = len(LATIN_WORD.findall(response))
    if han < MIN_HAN_CHARS and words < MIN_ENGLISH_WORDS:
        return "fragment"
    return None


def _in_language(text: str, language: str) -> bool:
    """Whether a reply is written in the shopper's language (order numbers and names in Latin letters allowed)."""
    han = len(HAN.findall(text))
    words = len(LATIN_WORD.findall(text))
    if language == "Chinese":
        return han > 0 and han >= words
    return han == 0 or words > han


RETRY_INSTRUCTION = {
    "fragment": "Answer the customer's question in one or two complete sentences, with the details from the entries.",
    "wrong_language": "Write your whole reply in {language}.",
}


def retry_messages(messages: list[ChatMessage], reason: Misfit, question: str) -> list[ChatMessage]:
    """The messages of a second, plain-text try: what was wrong is said last, where small models heed it."""
    known = written_in(question)
    language = known or "the customer's language"
    instruction = RETRY_INSTRUCTION[reason].format(language=language)
    if reason == "fragment" and known is not None:
        instruction += f" Write in {language}."
    system = ChatMessage(role="system", content=f"{messages[0].content}\n\n{instruction}")
    return [system, *messages[1:]]
