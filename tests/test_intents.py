"""Intents, frustration and the replies the model must not give (stand-in embedder and LLM)."""

from __future__ import annotations

from services.chat.analysis import MessageAnalyzer
from services.chat.contracts import ChatRequest
from services.chat.intents import IntentClassifier, frustration_signals
from services.chat.pipeline import ChatPipeline
from services.config import IntentConfig, OrchestratorConfig
from services.schemas import Embedding
from services.sessions import Turn
from tests.conftest import orchestrator_args
from tests.test_pipeline import Generator, Retriever

AXES = ["order", "complain", "human", "hello", "poem", "election"]


class KeywordEmbedder:
    """One axis per topic word; texts with none of them point elsewhere."""

    async def embed(self, texts: list[str]) -> list[Embedding]:
        vectors = []
        for text in texts:
            hits = [1.0 if word in text.lower() else 0.0 for word in AXES] + [0.1]
            norm = sum(v * v for v in hits) ** 0.5
            vectors.append(Embedding(dense=[v / norm for v in hits]))
        return vectors


INTENTS = IntentConfig(
    examples={
        "order_status": ["where is my order"], "complaint": ["I complain"], "human_agent": ["a human please"],
        "chit_chat": ["hello"], "out_of_scope": ["write a poem"], "sensitive": ["the election"],
    },
    threshold=0.9,
)  # fmt: skip


def pipeline(**overrides: object) -> tuple[ChatPipeline, Generator]:
    config = OrchestratorConfig.model_validate(orchestrator_args(**overrides))
    intents = config.intents if "intents" in overrides else INTENTS
    analyzer = MessageAnalyzer([], 1.0, KeywordEmbedder(), IntentClassifier(intents))
    generator = Generator()
    return ChatPipeline(config, Retriever(0.8), generator, analyzer=analyzer), generator


async def ask(chat: ChatPipeline, message: str, session_id: str | None = None) -> dict[str, object]:
    reply = await chat.answer(chat._config.tenants[0], ChatRequest(user_id="u", message=message, session_id=session_id))
    return reply.model_dump()


async def test_asking_for_a_human_hands_over_without_the_model() -> None:
    chat, generator = pipeline()
    for message in ("Can I get a human please?", "我要转人工"):
        reply = await ask(chat, message)
        assert reply["intent"] == "human_agent"
        assert reply["actions"] == [{"type": "handoff", "reason": "the shopper asked for a human agent"}]
        assert reply["response"].startswith("I'm connecting you with a human colleague")
    assert generator.calls == []


async def test_frustration_hands_over() -> None:
    chat, generator = pipeline()
    first = await ask(chat, "How long do returns take?")
    assert first["actions"] == [] and len(generator.calls) == 1
    again = await ask(chat, "How long do returns take???", session_id=str(first["session_id"]))
    [action] = again["actions"]  # type: ignore[misc]
    assert action["type"] == "handoff"
    assert "repeated question or exclamation marks" in action["reason"]
    assert "asked the same question again" in action["reason"]
    assert len(generator.calls) == 1


async def test_a_complaint_with_angry_words_hands_over_but_a_calm_one_is_answered() -> None:
    chat, generator = pipeline()
    calm = await ask(chat, "I want to complain about a late delivery.")
    assert calm["intent"] == "complaint" and calm["actions"] == [] and len(generator.calls) == 1
    angry = await ask(chat, "I complain, this is the worst service, 垃圾!")
    assert angry["actions"][0]["type"] == "handoff"  # type: ignore[index]


async def test_sensitive_and_out_of_scope_get_the_standard_replies() -> None:
    tenants = orchestrator_args()["tenants"]
    tenants[0]["standard_replies"] = {"sensitive": "We stay out of that. 此话题不便讨论。"}
    chat, generator = pipeline(tenants=tenants)
    sensitive = await ask(chat, "What about the election?")
    assert sensitive["response"] == "We stay out of that. 此话题不便讨论。"
    assert sensitive["actions"] == [{"type": "guardrail", "reason": "sensitive topic"}]
    poem = await ask(chat, "Write me a poem about sofas")
    assert poem["intent"] == "out_of_scope" and poem["response"].startswith("I can help with our products")
    assert generator.calls == []


async def test_chit_chat_is_answered_by_the_persona_without_knowledge() -> None:
    chat, generator = pipeline()
    reply = await ask(chat, "hello there")
    assert reply["intent"] == "chit_chat" and reply["sources"] == []
    # Persona only: no chunk between the heading and the reply instruction.
    assert "Knowledge entries:\n\n\nThe customer writes in" in generator.calls[0][0].content  # no entries


async def test_policy_questions_go_to_the_knowledge_base() -> None:
    chat, _ = pipeline()
    reply = await ask(chat, "How long do returns take?")
    assert reply["intent"] == "policy_question" and reply["sources"]


def test_frustration_signals() -> None:
    config = IntentConfig()
    assert frustration_signals("where is it???", [], config) == ["repeated question or exclamation marks"]
    assert frustration_signals("你们真是垃圾", [], config) == ["angry words: 垃圾"]
    history = [Turn("Where is my order 123?", "It ships today.")]
    assert frustration_signals("where is my order 123", history, config) == [
        "asked the same question again after an answer"
    ]
    assert frustration_signals("Thanks, that helps.", history, config) == []


def test_rules_win_over_examples_and_bad_rules_are_refused() -> None:
    import pytest
    from pydantic import ValidationError

    classifier = IntentClassifier(IntentConfig())
    assert classifier.classify("请帮我转人工", [1.0], [], []).by_rule
    with pytest.raises(ValidationError, match="bad pattern"):
        IntentConfig(rules={"sensitive": ["(unclosed"]})
    with pytest.raises(ValidationError, match="unknown intents"):
        IntentConfig(examples={"weather": ["rain?"]})


def test_asking_again_shouting_and_complaints_are_signals_in_both_languages() -> None:
    config = IntentConfig()
    third = frustration_signals("I want a refund, this is the third time I ask!!! ???", [], config)
    assert third == ["repeated question or exclamation marks", "says they asked before"]
    assert "says they asked before" in frustration_signals("这是我第三次问退款了", [], config)
    assert "says they asked before" in frustration_signals("客服一直没回复", [], config)
    assert frustration_signals("WHERE IS MY PARCEL, I PAID TWO WEEKS AGO", [], config) == ["shouting in capitals"]
    assert frustration_signals("Is VAT included for LH-1001?", [], config) == []  # one acronym is no shouting
    assert frustration_signals("第二个问题：运费多少？", [], config) == []
    classifier = IntentClassifier(config)
    complaint = classifier.classify("我要投诉你们的物流", [0.0], [], [])
    assert (complaint.intent, complaint.by_rule) == ("complaint", True) and complaint.frustration


def test_counting_the_times_asked_and_asking_for_a_manager_are_recognized() -> None:
    config = IntentConfig()
    assert "says they asked before" in frustration_signals(
        "I've asked about this refund THREE times already", [], config
    )
    assert "says they asked before" in frustration_signals("照片我都发了三遍了，到底有没有人管啊", [], config)
    assert "says they asked before" not in frustration_signals("请一次发三张照片", [], config)
    classifier = IntentClassifier(config)
    for message in ("Stop it. I want to speak to a manager.", "找你们经理来"):
        assert classifier.classify(message, [0.0], [], []).intent == "human_agent"


def test_asking_to_be_put_through_to_a_person_is_a_request_for_a_human_in_both_languages() -> None:
    classifier = IntentClassifier(IntentConfig(examples={}))  # the rules alone
    for message in (
        "Please transfer me to a representative.",
        "Can you connect me with an agent",
        "Just get me somebody who knows what they're doing",
        "I want a real human, not this",
        "找个客服来跟我说",
        "不要再让机器人回复我",
        "有没有活人？",
    ):
        assert classifier.classify(message, [0.0], [], []).intent == "human_agent", message
    for message in ("Can I get a real wood table?", "Get me the invoice for my order", "客服电话是多少？"):
        assert classifier.classify(message, [0.0], [], []).intent != "human_agent", message


def test_counting_messages_and_saying_enough_are_frustration_in_both_languages() -> None:
    config = IntentConfig()
    assert frustration_signals("My fourth email about this deposit. Unbelievable.", [], config) == [
        "angry words: unbelievable",
        "says they asked before",
    ]
    assert "says they asked before" in frustration_signals("问了好几次了，还是没人处理", [], config)
    assert "says they asked before" in frustration_signals("说了多少遍了！", [], config)
    assert frustration_signals("退款申请提交一周了都没人管", [], config) == ["angry words: 没人管"]
    assert frustration_signals("I've had enough of waiting", [], config) == ["angry words: had enough"]
    assert frustration_signals("Is my second order eligible for the discount?", [], config) == []


def test_the_most_similar_example_names_the_intent_and_below_the_threshold_it_is_a_policy_question() -> None:
    import pytest

    classifier = IntentClassifier(INTENTS)
    examples = [text for _, text in classifier.examples]
    vectors = [[1.0 if i == j else 0.0 for j in range(len(examples))] for i in range(len(examples))]
    near_poem = [0.1] * len(examples)
    near_poem[examples.index("write a poem")] = 0.95
    classification = classifier.classify("compose verses", near_poem, vectors, [])
    assert (classification.intent, classification.score) == ("out_of_scope", 0.95)
    halfway = [0.5] * len(examples)  # equally near every example, and not near enough to any
    classification = classifier.classify("something else", halfway, vectors, [])
    assert (classification.intent, classification.score) == ("policy_question", 0.5)
    with pytest.raises(ValueError, match="5 example vectors for 6 examples"):
        classifier.classify("something else", halfway, vectors[:5], [])
