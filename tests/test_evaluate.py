"""cs-eval's scoring, figures and thresholds, on replies written here (the app is exercised in integration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cs_tools.evaluate import Question, failed_thresholds, load_questions, report, score, write_chart
from tests.conftest import REPO_ROOT


def reply(sources: list[str], outcome: str = "answered", actions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "response": "r",
        "outcome": outcome,
        "confidence": 0.8 if sources else 0.0,
        "sources": [{"doc_id": d, "title": d, "score": 0.9} for d in sources],
        "actions": actions or [],
    }


def q(id_: str, language: str, expect: Any) -> Question:
    return Question.model_validate({"id": id_, "language": language, "question": "?", "expect": expect})


def test_recall_mrr_and_refusals_are_counted_per_language() -> None:
    results = [
        score(q("a", "en", {"docs": ["x-en", "x-zh"]}), reply(["x-en", "y"]), 1.0),  # rank 1
        score(q("b", "en", {"docs": ["z"]}), reply(["y", "w", "z"]), 2.0),  # rank 3
        score(q("c", "zh", {"docs": ["x-zh"]}), reply([], "fallback"), 0.1),  # refused an answerable one
        score(q("d", "zh", "out_of_kb"), reply([], "fallback"), 0.1),
        score(q("e", "en", "out_of_kb"), reply(["y"]), 3.0),  # answered what the store does not know
        score(q("f", "zh", "out_of_kb"), reply([], "guardrail", [{"type": "guardrail"}]), 0.1),
        score(q("g", "en", "handover"), reply([], "handover", [{"type": "handoff", "reason": "r"}]), 0.1),
        score(q("h", "zh", "handover"), reply(["x-zh"]), 1.0),
    ]
    summary = report(results)
    overall, en, zh = summary["overall"], summary["by_language"]["en"], summary["by_language"]["zh"]
    assert (overall["recall_at_1"], overall["recall_at_3"]) == (round(1 / 3, 4), round(2 / 3, 4))
    assert overall["mrr"] == round((1 + 1 / 3) / 3, 4)
    assert (overall["fallback_recall"], overall["fallback_precision"]) == (round(2 / 3, 4), round(2 / 3, 4))
    assert overall["false_refusal_rate"] == round(1 / 3, 4) and overall["handover_rate"] == 0.5
    assert (en["recall_at_3"], zh["recall_at_3"], zh["fallback_recall"], en["fallback_recall"]) == (1.0, 0.0, 1.0, 0.0)
    assert overall["latency_p50_s"] == 0.55


def test_a_tool_question_passes_only_with_an_action_carrying_its_arguments() -> None:
    expect = {"tool": "get_order_status", "arguments": {"order_id": "LH-1001"}}
    ok = score(q("t", "en", expect), reply([], actions=[{"type": "order_status", "order_id": "LH-1001"}]), 1)
    wrong = score(q("u", "en", expect), reply([], actions=[{"type": "order_status", "order_id": "LH-1002"}]), 1)
    failed = score(q("v", "en", expect), reply([], actions=[{"type": "tool_failed", "order_id": "LH-1001"}]), 1)
    coupon = {"type": "tool_call", "tool": "check_coupon_rules", "arguments": {"code": "WELCOME50"}}
    other_tool = score(q("w", "en", {"tool": "check_coupon_rules", "arguments": {"order_id": "LH-1001"}}),
                       reply([], actions=[{"type": "order_status", "order_id": "LH-1001"}]), 1)  # fmt: skip
    generic = score(q("x", "en", {"tool": "check_coupon_rules", "arguments": {"code": "WELCOME50"}}),
                    reply([], actions=[coupon]), 1)  # fmt: skip
    assert (ok.tool_ok, wrong.tool_ok, failed.tool_ok, other_tool.tool_ok, generic.tool_ok) == (
        True, False, False, False, True
    )  # fmt: skip
    assert report([ok, wrong, failed])["overall"]["tool_accuracy"] == round(1 / 3, 4)


def test_thresholds_are_checked_overall_and_in_every_language() -> None:
    results = [
        score(q("a", "en", {"docs": ["x"]}), reply(["x"]), 1.0),
        score(q("b", "zh", {"docs": ["x"]}), reply(["y"]), 1.0),
    ]
    summary = report(results)
    assert failed_thresholds(summary, {"min_recall_at_3": 0.5}) == ["zh recall_at_3 0.0 < 0.5"]
    assert failed_thresholds(summary, {"max_false_refusal_rate": 0.0, "min_handover_rate": 0.9}) == []


def test_question_files_are_validated_with_the_place_named(tmp_path: Path) -> None:
    bad = tmp_path / "q.yaml"
    bad.write_text("store: s\nquestions:\n  - {id: a, language: en, question: hi, expect: maybe}\n")
    with pytest.raises(ValueError, match=r"questions\.0\.expect"):
        load_questions(bad)
    bad.write_text("store: s\nquestions:\n  - {id: a, language: en, expect: handover}\n")
    with pytest.raises(ValueError, match="either question or turns"):
        load_questions(bad)


@pytest.mark.parametrize("name", ["lumen_home.yaml", "voltmart_electronics.yaml"])
def test_the_shipped_evaluation_sets_name_only_documents_their_store_has(name: str) -> None:
    import json

    questions = load_questions(REPO_ROOT / "examples" / "eval" / name)
    store_file = {"lumen_home.yaml": "lumen_home.json", "voltmart_electronics.yaml": "voltmart_electronics.json"}
    documents = json.loads((REPO_ROOT / "knowledge_sync" / "samples" / store_file[name]).read_text())["documents"]
    ids = {d["doc_id"] for d in documents}
    named = {
        doc for question in questions.questions if hasattr(question.expect, "docs") for doc in question.expect.docs
    }
    assert named <= ids
    languages = [question.language for question in questions.questions]
    assert languages.count("zh") >= len(languages) // 2 - 2
    kinds = [question.expect if isinstance(question.expect, str) else "x" for question in questions.questions]
    assert kinds.count("out_of_kb") >= 10 and kinds.count("handover") >= 6


def test_the_chart_is_written(tmp_path: Path) -> None:
    summary = report([score(q("a", "en", {"docs": ["x"]}), reply(["x"]), 1.0)])
    assert write_chart(summary, tmp_path / "chart.png") and (tmp_path / "chart.png").stat().st_size > 1000


class SessionIssuer:
    """Stands in for ``POST /v1/sessions``: issues ids as the server does."""

    def __init__(self) -> None:
        from services.sessions import SessionIds

        self.ids, self.opened = SessionIds(), 0

    async def post(self, path: str, json: dict[str, Any], headers: dict[str, str]) -> Any:
        assert path == "/v1/sessions"
        self.opened += 1
        body = {"session_id": self.ids.issue("lumen", json["user_id"]), "user_id": json["user_id"]}
        return type("Response", (), {"status_code": 201, "json": lambda _: body, "text": ""})()


async def test_canary_sessions_are_opened_until_one_falls_inside_the_canary_share() -> None:
    from cs_tools.evaluate import CanaryTarget
    from services.adapters.registry import canary_bucket

    canary, client = CanaryTarget("lumen", "voice@v2", percent=5.0), SessionIssuer()
    sessions = [await canary.session_for(client, "shopper-1", {}) for _ in range(20)]
    assert all(canary_bucket("lumen", s) < 5.0 for s in sessions) and len(set(sessions)) == 20
    assert client.opened > 20  # most sessions fall outside a 5% share and are not used
