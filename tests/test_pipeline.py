"""The dialogue pipeline with stand-in retriever and generator (unit level)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.chat.contracts import ChatReply, ChatRequest
from services.chat.pipeline import ChatPipeline
from services.chat.structured_reply import REPLY_INSTRUCTION, combined_confidence
from services.config import OrchestratorConfig, SamplingConfig
from services.schemas import ChatMessage, Embedding, GenerationChunk, KnowledgeChunk, RetrievedChunk, SearchResult
from tests.conftest import RecordingMetrics, orchestrator_args


class Retriever:
    def __init__(self, dense: float) -> None:
        self.dense = dense

    async def search(self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None) -> SearchResult:
        chunk = KnowledgeChunk(
            id=f"{tenant}:s:returns:0", tenant=tenant, source="s", doc_id="returns", chunk_no=0,
            title="Returns", text="Returns within 7 days.", content_hash="h",
        )  # fmt: skip
        return SearchResult(
            hits=[RetrievedChunk(chunk=chunk, score=0.03, dense_score=self.dense)], dense_candidates=[self.dense]
        )


class Generator:
    """Writes what a model under the reply schema writes; ``cites`` are the entry numbers it names when asked."""

    def __init__(self, cites: list[int] | None = None) -> None:
        self.calls: list[list[ChatMessage]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.cites = [1] if cites is None else cites

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        self.calls.append(messages)
        self.kwargs.append(kwargs)
        pieces = ["Within ", "7 days."]
        schema = kwargs.get("json_schema")
        if schema:  # what a model under the reply schema writes, in odd pieces
            pieces = ['{"respon', 'se": "Within ', "7 days \\u2014 ", 'see \\"Returns\\"', '.", "confidence": 0.5}']
            if "cited" in schema["properties"]:  # the citations come first
                pieces[0] = f'{{"cited": {self.cites}, "respon'
        for piece in pieces:
            yield GenerationChunk(text=piece)
        yield GenerationChunk(text="", finish_reason="stop")


def pipeline(dense: float, **overrides: object) -> tuple[ChatPipeline, Generator]:
    config = OrchestratorConfig.model_validate(orchestrator_args(**overrides))
    generator = Generator()
    return ChatPipeline(config, Retriever(dense), generator), generator


async def test_irrelevant_knowledge_gives_the_fallback_without_calling_the_llm() -> None:
    chat, generator = pipeline(dense=0.1)
    tenant = chat._config.tenants[0]
    reply = await chat.answer(tenant, ChatRequest(user_id="u", message="Capital of France?"))
    assert reply.response == "Sorry, I can't find that in our policies."
    assert (reply.confidence, reply.sources, reply.adapter) == (0.0, [], None)
    assert generator.calls == []


async def test_tenant_fallback_overrides_the_default() -> None:
    overrides = orchestrator_args()
    overrides["tenants"][0]["fallback_message"] = "Ask a human, please."
    chat, _ = pipeline(dense=0.0, tenants=overrides["tenants"])
    reply = await chat.answer(chat._config.tenants[0], ChatRequest(user_id="u", message="?!"))
    assert reply.response == "Ask a human, please."


async def test_relevant_knowledge_is_answered_and_history_feeds_the_next_prompt() -> None:
    # Streamed piece by piece: with check_numbers whole sentences are released (tested below),
    # with check_form the first sentence (tests/test_reply_form.py).
    chat, generator = pipeline(dense=0.8, check_numbers=False)
    tenant = chat._config.tenants[0]
    first = await chat.answer(tenant, ChatRequest(user_id="u", message="Returns?"))
    session = first.session_id  # issued by the server
    # Structured replies (as shipped): the response is decoded out of the model's JSON, and
    # the evidence 0.8 is lowered by the model's own 0.5.
    answer = 'Within 7 days \u2014 see "Returns".'
    assert (first.response, first.confidence) == (answer, combined_confidence(0.8, 0.5))
    assert [s.doc_id for s in first.sources] == ["returns"]
    items = [
        i
        async for i in await chat.prepare(tenant, ChatRequest(user_id="u", message="And refunds?", session_id=session))
    ]
    assert items[:-1] == ["Within ", "7 days \u2014 ", 'see "Returns"', "."] and isinstance(items[-1], ChatReply)
    second_prompt = generator.calls[1]
    # The conversation remembers the decoded answer, not the JSON the model wrote.
    assert [m.content for m in second_prompt[1:]] == ["Returns?", answer, "And refunds?"]


async def test_plain_text_replies_stream_the_models_text_as_is() -> None:
    chat, generator = pipeline(dense=0.8, structured_replies=False, check_numbers=False)
    tenant = chat._config.tenants[0]
    items = [i async for i in await chat.prepare(tenant, ChatRequest(user_id="u", message="Returns?"))]
    assert items[:-1] == ["Within ", "7 days."]
    reply = items[-1]
    assert isinstance(reply, ChatReply) and (reply.response, reply.confidence) == ("Within 7 days.", 0.8)
    assert generator.kwargs[0]["json_schema"] is None and REPLY_INSTRUCTION not in generator.calls[0][0].content


class RankedRetriever:
    """Fused order puts weak two-signal hits first and the one relevant dense hit last."""

    def __init__(self) -> None:
        self.asked_for: int | None = None

    async def search(self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None) -> SearchResult:
        self.asked_for = top_k
        hits = []
        for n, dense in enumerate([0.15, 0.17, 0.12, 0.16, 0.64]):
            chunk = KnowledgeChunk(
                id=f"{tenant}:s:d{n}:0", tenant=tenant, source="s", doc_id=f"d{n}", chunk_no=0,
                title=f"T{n}", text="Returns within 7 days.", content_hash="h",
            )  # fmt: skip
            hits.append(RetrievedChunk(chunk=chunk, score=0.05 - n / 100, dense_score=dense))
        return SearchResult(hits=hits[:top_k])


async def test_the_gate_sees_more_candidates_than_it_keeps() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args(retrieval_top_k=2, retrieval_candidates=5))
    retriever = RankedRetriever()
    chat = ChatPipeline(config, retriever, Generator())
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="dogs?"))
    assert retriever.asked_for == 5
    assert [s.doc_id for s in reply.sources] == ["d4"] and reply.confidence == combined_confidence(0.64, 0.5)


class CountingEmbedder:
    """Maps texts about "who" to one direction and everything else to another."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def embed(self, texts: list[str]) -> list[Embedding]:
        self.calls.append(texts)
        return [Embedding(dense=[1.0, 0.0] if "who" in t.lower() else [0.0, 1.0]) for t in texts]


class RecordingRetriever(Retriever):
    def __init__(self) -> None:
        super().__init__(dense=0.8)
        self.embeddings: list[Embedding | None] = []

    async def search(self, tenant: str, query: str, top_k: int, embedding: Embedding | None = None) -> SearchResult:
        self.embeddings.append(embedding)
        return await super().search(tenant, query, top_k)


async def test_message_is_embedded_once_and_assistant_questions_skip_the_knowledge_base() -> None:
    from services.chat.analysis import MessageAnalyzer

    config = OrchestratorConfig.model_validate(orchestrator_args())
    embedder, retriever, generator = CountingEmbedder(), RecordingRetriever(), Generator()
    questions = MessageAnalyzer(["Who are you?"], 0.9, embedder)
    chat = ChatPipeline(config, retriever, generator, analyzer=questions)
    tenant = config.tenants[0]

    policy = await chat.answer(tenant, ChatRequest(user_id="u", message="Returns?"))
    assert [s.doc_id for s in policy.sources] == ["returns"]
    assert embedder.calls == [["Returns?"], ["Who are you?"]]  # message once, examples once
    assert retriever.embeddings == [Embedding(dense=[0.0, 1.0])]  # reused, not recomputed

    identity = await chat.answer(tenant, ChatRequest(user_id="u", message="Who is this?"))
    assert (identity.confidence, identity.sources) == (combined_confidence(1.0, 0.5), [])
    assert len(retriever.embeddings) == 1  # the knowledge base was not asked
    # Persona only: no chunk between the heading and the reply instruction.
    assert "Knowledge entries:\n\n\nThe customer writes in" in generator.calls[-1][0].content  # no entries
    assert len(embedder.calls) == 3


async def test_answer_cache_serves_repeats_until_the_knowledge_changes() -> None:
    from services.chat.answer_cache import InProcessAnswerCache, normalize_question
    from services.config import AnswerCacheConfig

    generation = {"lumen": 1}

    async def version(tenant: str) -> int:
        return generation[tenant]

    config = OrchestratorConfig.model_validate(orchestrator_args())
    generator = Generator()
    chat = ChatPipeline(
        config, Retriever(0.8), generator, cache=InProcessAnswerCache(AnswerCacheConfig()), knowledge_version=version
    )
    tenant = config.tenants[0]
    first = await chat.answer(tenant, ChatRequest(user_id="u", message="How long are returns?"))
    again = await chat.answer(tenant, ChatRequest(user_id="v", message="  how LONG are returns？ "))
    assert (first.cached, again.cached, len(generator.calls)) == (False, True, 1)
    assert again.response == first.response and again.session_id != first.session_id
    assert normalize_question("Ｒｅｔｕｒｎｓ??") == "returns"

    # A follow-up depends on its conversation: never served from the cache.
    await chat.answer(tenant, ChatRequest(user_id="v", message="How long are returns?", session_id=again.session_id))
    assert len(generator.calls) == 2

    generation["lumen"] = 2  # a knowledge sync committed
    fresh = await chat.answer(tenant, ChatRequest(user_id="u", message="How long are returns?"))
    assert fresh.cached is False and len(generator.calls) == 3


async def test_feedback_names_a_recent_reply_of_the_callers_own_session() -> None:
    import pytest

    from services.chat.contracts import FeedbackRequest
    from services.errors import NotFoundError
    from tests.conftest import RecordingMetrics

    config = OrchestratorConfig.model_validate(orchestrator_args())
    metrics = RecordingMetrics()
    chat = ChatPipeline(config, Retriever(0.8), Generator(), metrics=metrics)
    lumen = config.tenants[0]
    reply = await chat.answer(lumen, ChatRequest(user_id="u", message="Returns?"))
    assert reply.reply_id and metrics.tags("cs_requests") == [{"tenant": "lumen", "outcome": "answered"}]
    verdict = FeedbackRequest(
        session_id=reply.session_id, user_id="u", reply_id=reply.reply_id, helpful=True, resolved=False
    )
    await chat.feedback(lumen, verdict)
    assert metrics.tags("cs_feedback") == [
        {"tenant": "lumen", "verdict": "helpful"},
        {"tenant": "lumen", "verdict": "unresolved"},
    ]
    other = lumen.model_copy(update={"tenant": "other"})
    with pytest.raises(NotFoundError, match="not among the recent replies"):
        await chat.feedback(other, verdict)  # another tenant cannot see, nor rate, this session
    with pytest.raises(NotFoundError, match="not among the recent replies"):
        await chat.feedback(lumen, verdict.model_copy(update={"user_id": "someone-else"}))  # nor another shopper
    with pytest.raises(ValueError, match="give helpful, resolved or both"):
        FeedbackRequest(session_id="s", user_id="u", reply_id="r")


async def test_structured_replies_stream_the_response_and_combine_confidences() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args(structured_replies=True, cite_sources=True))
    generator = Generator()
    chat = ChatPipeline(config, Retriever(0.8), generator)
    prepared = await chat.prepare(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))
    items = [item async for item in prepared]
    text = "".join(i for i in items if isinstance(i, str))
    assert text == 'Within 7 days \u2014 see "Returns".'
    reply = items[-1]
    assert isinstance(reply, ChatReply) and reply.response == text
    assert reply.confidence == 0.6  # evidence 0.8, lowered by the model's 0.5: 0.8 * (0.5 + 0.25)
    assert generator.kwargs[0]["json_schema"]["required"] == ["cited", "response", "confidence"]
    assert generator.kwargs[0]["json_schema"]["properties"]["cited"]["items"]["maximum"] == 1  # one entry shown
    assert "confidence" in generator.calls[0][0].content  # the system prompt asks for the JSON object
    assert reply.cited == ["returns"] and reply.outcome == "answered"


def test_reply_decoder_handles_escapes_split_across_pieces() -> None:
    from services.chat.structured_reply import ReplyStreamDecoder, combined_confidence

    decoder = ReplyStreamDecoder()
    pieces = ['{ "response" :', ' "a\\', "nb \\ud83d", "\\ude00 \\u4f60", '好", "confidence": 1}']
    assert "".join(decoder.feed(p) for p in pieces) == "a\nb \U0001f600 你好"
    assert decoder.model_confidence() == 1.0
    assert combined_confidence(0.7, None) == 0.7 and combined_confidence(0.7, 0.0) == 0.35


class CutShortGenerator(Generator):
    """A generation the token budget ends: vLLM's finish reason is ``length``."""

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        self.calls.append(messages)
        yield GenerationChunk(text="Within 7")
        yield GenerationChunk(text="", finish_reason="length", prompt_tokens=30, completion_tokens=24)


async def test_the_reply_says_how_generation_ended_and_the_openai_route_reports_it() -> None:
    from fastapi.testclient import TestClient

    from services.api.factory import create_api

    config = OrchestratorConfig.model_validate(orchestrator_args())
    chat = ChatPipeline(config, Retriever(0.8), CutShortGenerator())
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))
    assert (reply.finish_reason, reply.usage and reply.usage.completion_tokens) == ("length", 24)
    fallback = await ChatPipeline(config, Retriever(0.1), CutShortGenerator()).answer(
        config.tenants[0], ChatRequest(user_id="u", message="Capital of France?")
    )
    assert fallback.finish_reason == "stop"  # given without the model

    async def healthy() -> dict[str, str]:
        return {}

    from services.control_plane.directory import TenantDirectory

    app = create_api(config, chat, TenantDirectory.from_config(config.tenants), healthy)
    body = {"model": "lumen", "messages": [{"role": "user", "content": "Returns?"}]}
    with TestClient(app) as client:
        completion = client.post("/v1/chat/completions", json=body, headers={"X-API-Key": "test-key"}).json()
        streamed = client.post(
            "/v1/chat/completions", json=body | {"stream": True}, headers={"X-API-Key": "test-key"}
        ).text
    assert completion["choices"][0]["finish_reason"] == "length"
    assert '"finish_reason": "length"' in streamed.split("data: [DONE]")[0].strip().splitlines()[-1]


def test_training_replies_in_the_structured_mode_decode_as_the_served_ones() -> None:
    from cs_tools.train_adapter import chat_prompt
    from services.chat.structured_reply import REPLY_INSTRUCTION, ReplyStreamDecoder, reply_json

    text = reply_json('我是"流明"的客服。', 1.0)
    assert text == '{"response":"我是\\"流明\\"的客服。","confidence":1.0}'  # compact, as the engine writes it
    decoder = ReplyStreamDecoder()
    assert "".join(decoder.feed(piece) for piece in (text[:7], text[7:20], text[20:])) == '我是"流明"的客服。'
    assert decoder.model_confidence() == 1.0
    plain, structured = chat_prompt("P", "Q"), chat_prompt("P", "Q", structured=True)
    assert REPLY_INSTRUCTION not in plain[0]["content"] and structured[0]["content"].endswith(REPLY_INSTRUCTION)
    assert plain[1:] == structured[1:]


async def test_an_answer_that_cites_no_shown_entry_becomes_the_fallback_before_any_text() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args(structured_replies=True, cite_sources=True))
    for cites in ([], [2]):  # nothing cited; an entry it was not shown (schema-invalid, as a broken engine might)
        chat = ChatPipeline(config, Retriever(0.8), Generator(cites=cites))
        items = [item async for item in await chat.prepare(config.tenants[0], ChatRequest(user_id="u", message="?"))]
        reply = items[-1]
        assert items[:-1] == ["Sorry, I can't find that in our policies."]  # not one piece of the refused text
        assert isinstance(reply, ChatReply)
        assert (reply.outcome, reply.confidence, reply.response) == ("fallback", 0.0, items[0])


async def test_a_reply_object_without_a_response_is_the_fallback_and_counts_as_one() -> None:
    from tests.conftest import RecordingMetrics

    class Empty(Generator):
        async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenerationChunk]:
            yield GenerationChunk(text='{"cited": [1], "response": "", "confidence": 0.9}', finish_reason="stop")

    config = OrchestratorConfig.model_validate(orchestrator_args(structured_replies=True, cite_sources=True))
    metrics = RecordingMetrics()
    chat = ChatPipeline(config, Retriever(0.8), Empty(), metrics=metrics)
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))
    assert (reply.outcome, reply.response) == ("fallback", "Sorry, I can't find that in our policies.")
    assert metrics.tags("cs_requests") == [{"tenant": "lumen", "outcome": "fallback"}]


async def test_a_refused_answer_stops_its_generation() -> None:
    class Watched(Generator):
        finished: bool | None = None

        async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenerationChunk]:
            self.finished = False
            yield GenerationChunk(text='{"cited": [], "response": "Invented')
            yield GenerationChunk(text=' policy", "confidence": 0.9}', finish_reason="stop")
            self.finished = True

    config = OrchestratorConfig.model_validate(orchestrator_args(structured_replies=True, cite_sources=True))
    generator = Watched()
    reply = await ChatPipeline(config, Retriever(0.8), generator).answer(
        config.tenants[0], ChatRequest(user_id="u", message="Returns?")
    )
    assert reply.outcome == "fallback" and generator.finished is False  # closed after its first chunk


class Reranker:
    """Scores passages by a table of the words they contain."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[tuple[str, list[str]]] = []

    async def rerank(self, query: str, passages: list[str]) -> list[float]:
        self.calls.append((query, passages))
        return [next((s for word, s in self.scores.items() if word in p), 0.0) for p in passages]


def reranking_pipeline(reranker: Reranker, **overrides: Any) -> ChatPipeline:
    config = OrchestratorConfig.model_validate(
        orchestrator_args(retrieval_top_k=2, retrieval_candidates=5, reranking={"candidates": 4, "threshold": 0.5})
        | overrides
    )
    return ChatPipeline(config, RankedRetriever(), Generator(), reranker=reranker)


async def test_the_reranker_reorders_the_candidates_and_decides_what_is_relevant() -> None:
    # The fused order puts d4 last and the dense gate would keep only it; the cross-encoder
    # sees the best 4 candidates (d4 is not among them) and vouches for d2 alone.
    reranker = Reranker({"T2": 0.9, "T0": 0.3})
    chat = reranking_pipeline(reranker)
    reply = await chat.answer(chat._config.tenants[0], ChatRequest(user_id="u", message="dogs?"))
    [(query, passages)] = reranker.calls
    assert query == "dogs?" and passages == [f"T{n}\nReturns within 7 days." for n in range(4)]
    assert [s.doc_id for s in reply.sources] == ["d2"] and reply.sources[0].score == 0.9
    assert reply.confidence == combined_confidence(0.9, 0.5)


async def test_when_the_reranker_vouches_for_nothing_the_fallback_answers() -> None:
    chat = reranking_pipeline(Reranker({"T1": 0.2}))
    reply = await chat.answer(chat._config.tenants[0], ChatRequest(user_id="u", message="dogs?"))
    assert reply.outcome == "fallback" and reply.sources == [] and chat._generator.calls == []  # type: ignore[attr-defined]


async def test_without_reranking_in_the_config_a_given_reranker_is_not_called() -> None:
    reranker = Reranker({"T2": 0.9})
    config = OrchestratorConfig.model_validate(orchestrator_args(retrieval_top_k=2, retrieval_candidates=5))
    chat = ChatPipeline(config, RankedRetriever(), Generator(), reranker=reranker)
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="dogs?"))
    assert reranker.calls == [] and [s.doc_id for s in reply.sources] == ["d4"]


class PlainGenerator:
    """Writes the given pieces as plain text (structured replies off)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.closed = False

    async def stream(
        self, messages: list[ChatMessage], sampling: SamplingConfig, adapter: str | None, **kwargs: Any
    ) -> AsyncIterator[GenerationChunk]:
        try:
            for piece in self.pieces:
                yield GenerationChunk(text=piece)
            yield GenerationChunk(text="", finish_reason="stop")
        finally:
            self.closed = True


async def streamed(pieces: list[str]) -> tuple[list[str], ChatReply, RecordingMetrics, PlainGenerator]:
    """Stream one answer over the one entry "Returns within 7 days." and return its deltas and reply."""
    config = OrchestratorConfig.model_validate(orchestrator_args(structured_replies=False, check_numbers=True))
    generator, metrics = PlainGenerator(pieces), RecordingMetrics()
    chat = ChatPipeline(config, Retriever(0.8), generator, metrics=metrics)
    items = [i async for i in await chat.prepare(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))]
    reply = items[-1]
    assert isinstance(reply, ChatReply)
    return [i for i in items[:-1] if isinstance(i, str)], reply, metrics, generator


async def test_an_answer_inventing_a_number_is_never_shown_and_is_counted() -> None:
    deltas, reply, metrics, generator = await streamed(["Call our hotline ", "400-820-1234", " for returns. More"])
    fallback_text = "Sorry, I can't find that in our policies."
    assert deltas == [fallback_text] and reply.response == fallback_text
    assert (reply.outcome, reply.confidence) == ("fallback", 0.0)
    assert metrics.tags("cs_withheld_replies") == [{"tenant": "lumen", "reason": "unsupported_number"}]
    assert generator.closed  # generation was stopped, not run to its end


async def test_checked_sentences_are_streamed_and_the_fallback_follows_the_first_invented_number() -> None:
    deltas, reply, metrics, _ = await streamed(
        ["Returns are free within 7 ", "days. A restocking fee of 15", "% applies."]
    )
    fallback_text = "Sorry, I can't find that in our policies."
    assert deltas == ["Returns are free within 7 days.", f"\n\n{fallback_text}"]
    assert reply.response == f"Returns are free within 7 days.\n\n{fallback_text}" and reply.outcome == "fallback"
    assert metrics.tags("cs_withheld_replies") == [{"tenant": "lumen", "reason": "unsupported_number"}]


async def test_an_answer_whose_numbers_all_come_from_the_entry_is_given_whole() -> None:
    deltas, reply, metrics, _ = await streamed(["You have seven ", "days. Start under My Orders"])
    assert deltas == ["You have seven days.", " Start under My Orders"]
    assert (reply.response, reply.outcome) == ("You have seven days. Start under My Orders", "answered")
    assert metrics.tags("cs_withheld_replies") == []


async def test_a_reply_object_without_text_is_the_fallback_counted_as_undecodable() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args())
    metrics = RecordingMetrics()
    chat = ChatPipeline(
        config, Retriever(0.8), PlainGenerator(['{"response": "', '", "confidence": 1}']), metrics=metrics
    )
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))
    assert reply.outcome == "fallback"
    assert metrics.tags("cs_withheld_replies") == [{"tenant": "lumen", "reason": "undecodable"}]


async def test_an_answer_cut_off_by_the_token_budget_ends_at_its_last_complete_sentence() -> None:
    config = OrchestratorConfig.model_validate(orchestrator_args(structured_replies=False, check_numbers=True))

    class CutOff(PlainGenerator):
        async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenerationChunk]:
            for piece in ["Returns take 7 days. ", "Start one under My Or"]:
                yield GenerationChunk(text=piece)
            yield GenerationChunk(text="", finish_reason="length")

    chat = ChatPipeline(config, Retriever(0.8), CutOff([]))
    reply = await chat.answer(config.tenants[0], ChatRequest(user_id="u", message="Returns?"))
    assert (reply.response, reply.finish_reason) == ("Returns take 7 days.", "length")
