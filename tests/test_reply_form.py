"""Replies that are not an answer's form (a bare value, an entry's title, the wrong language) are asked again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.chat.contracts import ChatReply, ChatRequest
from services.chat.number_check import NumberGuard
from services.chat.pipeline import ChatPipeline
from services.chat.reply_form import misfit, retry_messages
from services.config import OrchestratorConfig, SamplingConfig
from services.schemas import ChatMessage, GenerationChunk
from tests.conftest import RecordingMetrics, orchestrator_args
from tests.test_pipeline import Retriever

TITLES = ["Returns", "退款到账时间"]


def test_an_entrys_title_alone_is_a_fragment_in_either_language() -> None:
    assert misfit("退款到账时间", "退款多久到账？", TITLES, from_entries=True) == "fragment"
    assert misfit("Returns.", "How do returns work?", TITLES, from_entries=True) == "fragment"


def test_a_bare_value_or_one_word_is_a_fragment() -> None:
    for reply, question in [("7", "How many days do I have?"), ("Yes", "Can I stack coupons?"), ("7天", "能退吗？")]:
        assert misfit(reply, question, TITLES, from_entries=True) == "fragment", reply


def test_full_sentences_that_quote_a_title_are_answers() -> None:
    assert misfit("退款到账时间：仓库验收后2个工作日内原路退回。", "退款多久到账？", TITLES, from_entries=True) is None
    assert misfit("Within 7 days.", "How many days do I have?", TITLES, from_entries=True) is None
    assert misfit("不可以。", "能叠加优惠券吗？", TITLES, from_entries=True) is None


def test_a_reply_in_another_language_than_the_shoppers_is_a_misfit_even_unfinished() -> None:
    assert misfit("I am the assistant of Lumen Home.", "你是谁？", [], from_entries=False) == "wrong_language"
    assert misfit("我是客服助手。", "Who are you, please?", [], from_entries=False, complete=False) == "wrong_language"
    # Order numbers and product names in Latin letters do not make a Chinese reply English.
    assert misfit("您的订单LH-1001已发货。", "我的订单LH-1001到哪了？", [], from_entries=False) is None


def test_greetings_and_replies_without_entries_are_not_judged_as_fragments() -> None:
    assert misfit("您好！", "你好", [], from_entries=False) is None
    assert misfit("Hi!", "hi", [], from_entries=False) is None


def test_no_text_at_all_is_left_to_the_undecodable_check() -> None:
    assert misfit("", "退款多久到账？", TITLES, from_entries=True) is None


def test_the_retry_says_what_was_wrong_last_in_the_system_prompt() -> None:
    messages = [ChatMessage(role="system", content="Persona."), ChatMessage(role="user", content="你是谁？")]
    again = retry_messages(messages, "wrong_language", "你是谁？")
    assert again[0].content.endswith("Write your whole reply in Chinese.") and again[1:] == messages[1:]
    assert "complete sentences" in retry_messages(messages, "fragment", "你是谁？")[0].content


def test_without_numbers_to_check_only_the_first_sentence_is_held_then_text_streams_as_it_comes() -> None:
    guard = NumberGuard(None)
    assert guard.feed("Within 30 ") == ("", [])
    assert guard.feed("days. Start") == ("Within 30 days.", [])  # no evidence: 30 is not checked
    assert guard.feed(" under My") == (" Start under My", [])
    assert guard.feed(" Orders") == (" Orders", [])
    assert guard.flush() == ("", [])


class Scripted:
    """Under the reply schema writes ``first``; asked again (no schema), writes ``again`` as plain text."""

    def __init__(self, first: str, again: str) -> None:
        self.first, self.again = first, again
        self.calls: list[dict[str, Any]] = []
        self.closed = 0

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        self.calls.append({"messages": messages, **kwargs})
        text = f'{{"response": "{self.first}", "confidence": 0.9}}' if kwargs.get("json_schema") else self.again
        try:
            for piece in [text[: len(text) // 2], text[len(text) // 2 :]]:
                yield GenerationChunk(text=piece)
            yield GenerationChunk(text="", finish_reason="stop")
        finally:
            self.closed += 1


async def answered(first: str, again: str, message: str) -> tuple[list[str], ChatReply, RecordingMetrics, Scripted]:
    args = orchestrator_args(structured_replies=True, check_numbers=True, check_form=True)
    config = OrchestratorConfig.model_validate(args)
    generator, metrics = Scripted(first, again), RecordingMetrics()
    chat = ChatPipeline(config, Retriever(0.8), generator, metrics=metrics)
    items = [i async for i in await chat.prepare(config.tenants[0], ChatRequest(user_id="u", message=message))]
    reply = items[-1]
    assert isinstance(reply, ChatReply)
    return [i for i in items[:-1] if isinstance(i, str)], reply, metrics, generator


async def test_a_title_echo_is_never_shown_and_the_plain_text_retry_answers() -> None:
    deltas, reply, metrics, generator = await answered("Returns", "You can return items within 7 days.", "Returns?")
    assert deltas == ["You can return items within 7 days."] and reply.outcome == "answered"
    assert generator.calls[1].get("json_schema") is None  # the retry is plain text
    assert metrics.tags("cs_reply_retries") == [{"tenant": "lumen", "reason": "fragment"}]
    assert metrics.tags("cs_withheld_replies") == []


async def test_a_reply_in_the_wrong_language_is_stopped_at_its_first_sentence_and_asked_again() -> None:
    deltas, reply, metrics, generator = await answered(
        "Returns are accepted within 7 days. More English follows here", "七天内可以退货。", "退货要几天？"
    )
    assert deltas == ["七天内可以退货。"] and reply.response == "七天内可以退货。"
    assert generator.closed == 2  # the first generation was stopped, not run to its end
    assert metrics.tags("cs_reply_retries") == [{"tenant": "lumen", "reason": "wrong_language"}]


async def test_a_retry_that_is_still_a_fragment_becomes_the_counted_fallback() -> None:
    deltas, reply, metrics, _ = await answered("7", "7", "How many days do I have for returns?")
    assert reply.outcome == "fallback" and deltas == [reply.response]
    assert metrics.tags("cs_withheld_replies") == [{"tenant": "lumen", "reason": "fragment"}]


async def test_a_retry_is_checked_for_invented_numbers_too() -> None:
    _, reply, metrics, _ = await answered("Returns", "You can return items within 30 days.", "Returns?")
    assert reply.outcome == "fallback"
    assert metrics.tags("cs_withheld_replies") == [{"tenant": "lumen", "reason": "unsupported_number"}]


async def test_with_the_form_check_off_a_fragment_is_shown_as_written() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args(check_form=False))
    generator, metrics = Scripted("Returns", "unused"), RecordingMetrics()
    reply = await ChatPipeline(config, Retriever(0.8), generator, metrics=metrics).answer(
        config.tenants[0], ChatRequest(user_id="u", message="Returns?")
    )
    assert (reply.response, reply.outcome, len(generator.calls)) == ("Returns", "answered", 1)
