"""``cs-eval``: measure a running app's answers against a question file, and gate on the figures.

A question file (YAML) names the tenant and its questions, each with what a correct reply
shows: the knowledge documents it must rest on (``docs``), a refusal (``out_of_kb``: the
fallback or the out-of-scope reply), a handover (``handover``), or a tool action with its
arguments (``tool``). Multi-turn questions send their earlier turns first in one session.
The figures, per language and overall: recall@1/@3 and MRR of the expected documents among
the reply's sources, fallback precision and recall (a refusal of an answerable question
counts against precision), the rate of answerable questions refused, the handover rate,
the share of answers whose citations are all among their retrieved sources, and latency
p50/p95. A JSON report and a chart are written; the exit status is 1 when a figure is
below its ``--min-*`` (or above its ``--max-*``) threshold, so a deploy or an adapter
activation can be gated on it.

Usage::

    cs-eval examples/eval/lumen_home.yaml --app-url http://127.0.0.1:8000 --api-key dev-lumen-key \
        --report eval-lumen.json --min-recall-at-3 0.9 --min-fallback-recall 0.95

With ``--canary`` (and an admin key) the tenant's canary adapter version is measured
instead of its active one: each question's session is chosen inside the canary's share of
sessions, and a reply from any other version fails the run. ``--promote-on-pass`` then
promotes the canary when every threshold holds, ``--abort-on-fail`` ends it when one does
not, so a canary can be gated on the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

OUT_OF_KB: Literal["out_of_kb"] = "out_of_kb"
HANDOVER: Literal["handover"] = "handover"
REFUSING_OUTCOMES = {"fallback", "guardrail"}
#: The built-in tools' action types (other tools' actions are ``tool_call`` and name the tool).
TOOL_OF_ACTION = {"order_status": "get_order_status", "ticket_created": "create_support_ticket"}
TOOL_OF_ACTION["handoff"] = "transfer_to_human"


class ExpectedDocs(BaseModel):
    """An answerable question: any of these documents holds the answer."""

    model_config = ConfigDict(extra="forbid")
    docs: list[str] = Field(min_length=1)


class ExpectedTool(BaseModel):
    """A question a tool must act on: an action carrying these arguments."""

    model_config = ConfigDict(extra="forbid")
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Question(BaseModel):
    """One evaluated question (the last of its turns)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    language: str = Field(min_length=2, max_length=8)
    question: str | None = None
    turns: list[str] | None = Field(None, min_length=1)
    user_id: str = "eval-shopper"
    expect: ExpectedDocs | ExpectedTool | Literal["out_of_kb", "handover"]

    @model_validator(mode="after")
    def _one_way_to_ask(self) -> Question:
        if (self.question is None) == (self.turns is None):
            raise ValueError(f"{self.id}: give either question or turns")
        return self

    @property
    def messages(self) -> list[str]:
        """The messages sent, in order; the last one is evaluated."""
        return self.turns if self.turns is not None else [self.question or ""]


class QuestionFile(BaseModel):
    """A tenant's evaluation set."""

    model_config = ConfigDict(extra="forbid")
    store: str
    description: str = ""
    questions: list[Question] = Field(min_length=1)


class Result(BaseModel):
    """What the app replied to one question, and how it scores."""

    id: str
    language: str
    kind: str  # docs | out_of_kb | handover | tool
    response: str = ""
    outcome: str | None = None
    sources: list[str] = Field(default_factory=list)
    cited: list[str] | None = None
    actions: list[dict[str, Any]] = Field(default_factory=list)
    confidence: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    rank: int | None = None  # of the first expected document among the sources (1 = first)
    refused: bool = False
    handed_over: bool = False
    tool_ok: bool | None = None


def load_questions(path: Path) -> QuestionFile:
    """Read and validate a question file.

    Raises:
        ValueError: unreadable YAML or an invalid question, named by its id or position.

    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not readable YAML: {err}") from err
    try:
        questions = QuestionFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {where}: {first['msg']}") from err
    ids = [q.id for q in questions.questions]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: question ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return questions


def score(question: Question, reply: dict[str, Any], seconds: float) -> Result:
    """Score one reply against what the question expects."""
    expect = question.expect
    kind = "docs" if isinstance(expect, ExpectedDocs) else "tool" if isinstance(expect, ExpectedTool) else expect
    sources = [str(s["doc_id"]) for s in reply.get("sources", [])]
    actions = list(reply.get("actions", []))
    outcome = reply.get("outcome")
    result = Result(
        id=question.id,
        language=question.language,
        kind=kind,
        response=str(reply.get("response", "")),
        outcome=outcome,
        sources=sources,
        cited=reply.get("cited"),
        actions=actions,
        confidence=float(reply.get("confidence", 0.0)),
        seconds=round(seconds, 3),
    )
    result.refused = outcome in REFUSING_OUTCOMES and not any(a.get("type") == "handoff" for a in actions)
    result.handed_over = any(a.get("type") == "handoff" for a in actions)
    if isinstance(expect, ExpectedDocs):
        ranks = [n for n, doc in enumerate(sources, start=1) if doc in expect.docs]
        result.rank = ranks[0] if ranks else None
    if isinstance(expect, ExpectedTool):
        result.tool_ok = any(_acted(expect, action) for action in actions)
    return result


def _acted(expect: ExpectedTool, action: dict[str, Any]) -> bool:
    """Whether an action is the expected tool's, with the expected arguments (in it or in its ``arguments``)."""
    tool = action.get("tool") if action.get("type") == "tool_call" else TOOL_OF_ACTION.get(str(action.get("type")))
    arguments = action.get("arguments") or {}
    return tool == expect.tool and all(action.get(k, arguments.get(k)) == v for k, v in expect.arguments.items())


@dataclass(frozen=True)
class CanaryTarget:
    """The canary version a run measures: which tenant, which version id, what share of sessions."""

    tenant: str
    adapter: str  # name@version, as replies name it
    percent: float

    async def session_for(self, client: Any, user_id: str, headers: dict[str, str]) -> str:
        """A session of this user that the canary serves (the registry's sticky bucket).

        Session ids are issued by the server (``POST /v1/sessions``, which generates
        nothing), so sessions are opened until one falls inside the canary's share.
        """
        from services.adapters.registry import canary_bucket

        for _ in range(max(10, int(2000 / max(self.percent, 0.01)))):  # a 1% canary: ~100 sessions
            response = await client.post("/v1/sessions", json={"user_id": user_id}, headers=headers)
            if response.status_code != 201:
                raise RuntimeError(f"HTTP {response.status_code} opening a session: {response.text[:300]}")
            session_id = str(response.json()["session_id"])
            if canary_bucket(self.tenant, session_id) < self.percent:
                return session_id
        raise RuntimeError(f"no session opened falls inside a {self.percent}% canary")


async def ask(client: Any, question: Question, api_key: str, canary: CanaryTarget | None = None) -> Result:
    """Send the question's turns in one session; score the reply to the last."""
    headers = {"Authorization": f"Bearer {api_key}"}
    session_id: str | None = None
    reply: dict[str, Any] = {}
    seconds = 0.0
    try:
        if canary is not None:
            session_id = await canary.session_for(client, question.user_id, headers)
        for message in question.messages:
            body: dict[str, Any] = {"user_id": question.user_id, "message": message}
            if session_id:
                body["session_id"] = session_id
            started = time.monotonic()
            response = await client.post("/v1/chat", json=body, headers=headers)
            seconds = time.monotonic() - started
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            reply = response.json()
            session_id = reply.get("session_id")
            # Replies given without the model (fallback, handover) name no adapter.
            if canary is not None and reply.get("adapter") not in (None, canary.adapter):
                raise RuntimeError(f"answered by {reply.get('adapter')!r}, not the canary {canary.adapter!r}")
    except Exception as err:  # a failed question is reported, never dropped
        result = score(question, {}, seconds)
        result.error = f"{type(err).__name__}: {err}"
        return result
    return score(question, reply, seconds)


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def figures(results: Sequence[Result]) -> dict[str, Any]:
    """The evaluation figures of a set of results."""
    answerable = [r for r in results if r.kind == "docs"]
    out_of_kb = [r for r in results if r.kind == OUT_OF_KB]
    handover = [r for r in results if r.kind == HANDOVER]
    tools = [r for r in results if r.kind == "tool"]
    refused = [r for r in results if r.refused]
    answered_with_sources = [r for r in results if r.cited is not None and not r.refused and r.sources]
    latencies = sorted(r.seconds for r in results if r.error is None)
    return {
        "questions": len(results),
        "errors": sum(r.error is not None for r in results),
        "recall_at_1": _rate(sum(r.rank == 1 for r in answerable), len(answerable)),
        "recall_at_3": _rate(sum(r.rank is not None and r.rank <= 3 for r in answerable), len(answerable)),
        "mrr": round(sum(1 / r.rank for r in answerable if r.rank) / len(answerable), 4) if answerable else None,
        "fallback_recall": _rate(sum(r.refused for r in out_of_kb), len(out_of_kb)),
        "fallback_precision": _rate(sum(r.kind == OUT_OF_KB for r in refused), len(refused)),
        "false_refusal_rate": _rate(sum(r.refused for r in answerable), len(answerable)),
        "handover_rate": _rate(sum(r.handed_over for r in handover), len(handover)),
        "tool_accuracy": _rate(sum(bool(r.tool_ok) for r in tools), len(tools)),
        "citation_rate": _rate(
            sum(bool(r.cited) and set(r.cited or []) <= set(r.sources) for r in answered_with_sources),
            len(answered_with_sources),
        ),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3)
        if latencies
        else None,
    }


def report(results: Sequence[Result]) -> dict[str, Any]:
    """Figures overall and per language."""
    languages = sorted({r.language for r in results})
    return {
        "overall": figures(results),
        "by_language": {lang: figures([r for r in results if r.language == lang]) for lang in languages},
    }


#: Threshold flags: (flag, figure, whether the figure must be at least or at most the value).
THRESHOLDS = [
    ("min_recall_at_3", "recall_at_3", "min"),
    ("min_recall_at_1", "recall_at_1", "min"),
    ("min_fallback_recall", "fallback_recall", "min"),
    ("min_fallback_precision", "fallback_precision", "min"),
    ("max_false_refusal_rate", "false_refusal_rate", "max"),
    ("min_handover_rate", "handover_rate", "min"),
    ("min_citation_rate", "citation_rate", "min"),
]


def failed_thresholds(summary: dict[str, Any], limits: dict[str, float | None]) -> list[str]:
    """The thresholds a summary misses, overall and in every language (a figure that is absent passes)."""
    misses = []
    scopes = {"overall": summary["overall"], **summary["by_language"]}
    for flag, figure, bound in THRESHOLDS:
        limit = limits.get(flag)
        if limit is None:
            continue
        for scope, values in scopes.items():
            value = values.get(figure)
            if value is not None and (value < limit if bound == "min" else value > limit):
                misses.append(f"{scope} {figure} {value} {'<' if bound == 'min' else '>'} {limit}")
    return misses


def write_chart(summary: dict[str, Any], path: Path) -> bool:
    """A bar chart of the rates per language (needs matplotlib); returns whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = ["recall_at_1", "recall_at_3", "mrr", "fallback_recall", "fallback_precision", "handover_rate"]
    scopes = {"overall": summary["overall"], **summary["by_language"]}
    figure, axes = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(scopes)
    for n, (scope, values) in enumerate(scopes.items()):
        axes.bar([i + n * width for i in range(len(names))], [values.get(k) or 0 for k in names], width, label=scope)
    axes.set_xticks([i + width * (len(scopes) - 1) / 2 for i in range(len(names))], names, rotation=15)
    axes.set_ylim(0, 1.05)
    axes.legend()
    axes.set_title("cs-eval")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


async def run(
    questions: QuestionFile,
    app_url: str,
    api_key: str,
    concurrency: int,
    timeout_s: float,
    canary: CanaryTarget | None = None,
) -> list[Result]:
    """Ask every question (``concurrency`` at a time) with a progress bar."""
    import httpx
    from tqdm import tqdm

    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=app_url.rstrip("/"), timeout=timeout_s) as client:
        with tqdm(total=len(questions.questions), desc=f"cs-eval {questions.store}", unit="q", file=sys.stderr) as bar:

            async def one(question: Question) -> Result:
                async with limit:
                    result = await ask(client, question, api_key, canary)
                bar.update()
                return result

            return list(await asyncio.gather(*(one(q) for q in questions.questions)))


def canary_of(app_url: str, admin_key: str, tenant: str, timeout_s: float) -> CanaryTarget:
    """The tenant's running canary, read from the admin API.

    Raises:
        ValueError: the admin API refused, or the tenant has no canary running.

    """
    import httpx

    response = httpx.get(f"{app_url.rstrip('/')}/admin/adapters", headers={"X-API-Key": admin_key}, timeout=timeout_s)
    if response.status_code != 200:
        raise ValueError(f"the admin API answered {response.status_code}: {response.text[:300]}")
    rollout = response.json().get("tenants", {}).get(tenant) or {}
    canary = rollout.get("canary")
    if not canary:
        raise ValueError(f"tenant {tenant!r} has no canary running")
    return CanaryTarget(tenant, f"{rollout['adapter']}@{canary['version']}", float(canary["percent"]))


def record_evaluation(
    app_url: str,
    admin_key: str,
    adapter: str,
    summary: dict[str, Any],
    misses: list[str],
    questions: str,
    timeout_s: float,
) -> None:
    """Keep this run's result with the canary version in the adapter registry (the console shows it).

    Raises:
        ValueError: the admin API refused it.

    """
    import httpx

    name, _, version = adapter.partition("@")
    figures = {k: v for k, v in summary["overall"].items() if isinstance(v, int | float) or v is None}
    body = {"passed": not misses, "failed": misses[:100], "figures": figures, "questions": questions[-300:]}
    url = f"{app_url.rstrip('/')}/admin/adapters/{name}/versions/{version}/evaluation"
    response = httpx.put(url, json=body, headers={"X-API-Key": admin_key}, timeout=timeout_s)
    if response.status_code != 200:
        raise ValueError(f"the evaluation was not recorded: {response.status_code}: {response.text[:300]}")


def settle_canary(app_url: str, admin_key: str, tenant: str, passed: bool, timeout_s: float) -> str:
    """Promote (passed) or end (failed) the tenant's canary; what was done, for the log."""
    import httpx

    url = f"{app_url.rstrip('/')}/admin/tenants/{tenant}/adapter/canary"
    headers = {"X-API-Key": admin_key}
    if passed:
        response = httpx.post(f"{url}/promote", headers=headers, timeout=timeout_s)
    else:
        response = httpx.delete(url, headers=headers, timeout=timeout_s)
    if response.status_code != 200:
        raise ValueError(f"the admin API answered {response.status_code}: {response.text[:300]}")
    return "canary promoted" if passed else "canary ended"


def _table(summary: dict[str, Any]) -> str:
    scopes = {"overall": summary["overall"], **summary["by_language"]}
    keys = list(summary["overall"])
    lines = [f"{'':<22}" + "".join(f"{s:>10}" for s in scopes)]
    for key in keys:
        cells = "".join(f"{'-' if scopes[s][key] is None else scopes[s][key]!s:>10}" for s in scopes)
        lines.append(f"{key:<22}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; exit 0 when every threshold holds, 1 when one is missed, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="cs-eval", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("questions", type=Path, help="Question file (YAML).")
    parser.add_argument("--app-url", required=True, help="Base URL of the running app, e.g. http://127.0.0.1:8000.")
    parser.add_argument("--api-key", required=True, help="The tenant's API key.")
    parser.add_argument("--report", type=Path, help="Write the JSON report here (with every reply).")
    parser.add_argument("--chart", type=Path, help="Write a PNG chart here (needs matplotlib).")
    parser.add_argument("--concurrency", type=int, default=1, help="Questions in flight at once (default 1).")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds per request.")
    parser.add_argument("--only", help="Evaluate only the questions whose id starts with this prefix.")
    for flag, figure, bound in THRESHOLDS:
        side = "below" if bound == "min" else "above"
        parser.add_argument(f"--{flag.replace('_', '-')}", type=float, help=f"Fail when {figure} is {side} this.")
    canary_flags = parser.add_argument_group("adapter canary")
    canary_flags.add_argument(
        "--canary", action="store_true", help="Measure the tenant's canary version (the file's store is the tenant)."
    )
    canary_flags.add_argument("--admin-key", help="Admin API key (with --canary).")
    canary_flags.add_argument("--promote-on-pass", action="store_true", help="Promote the canary when all holds.")
    canary_flags.add_argument("--abort-on-fail", action="store_true", help="End the canary when a threshold fails.")
    args = parser.parse_args(argv)
    if (args.canary or args.promote_on_pass or args.abort_on_fail) and not (args.canary and args.admin_key):
        parser.error("--promote-on-pass and --abort-on-fail need --canary, and --canary needs --admin-key")
    try:
        questions = load_questions(args.questions)
        canary = canary_of(args.app_url, args.admin_key, questions.store, args.timeout) if args.canary else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.only:
        questions.questions = [q for q in questions.questions if q.id.startswith(args.only)]
    concurrency = max(1, args.concurrency)
    results = asyncio.run(run(questions, args.app_url, args.api_key, concurrency, args.timeout, canary))
    summary = report(results)
    print(_table(summary))
    for result in results:
        if result.error:
            print(f"error {result.id}: {result.error}", file=sys.stderr)
    if args.report:
        document = {"store": questions.store, "file": str(args.questions), **summary}
        document["results"] = [r.model_dump() for r in results]
        args.report.write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    if args.chart and not write_chart(summary, args.chart):
        print("no chart: matplotlib is not installed (pip install 'cs-platform[bench]')", file=sys.stderr)
    misses = failed_thresholds(summary, {flag: getattr(args, flag) for flag, _, _ in THRESHOLDS})
    if summary["overall"]["errors"]:
        misses.append(f"{summary['overall']['errors']} questions failed")
    for miss in misses:
        print(f"below threshold: {miss}", file=sys.stderr)
    if canary is not None:
        try:
            record_evaluation(
                args.app_url, args.admin_key, canary.adapter, summary, misses, str(args.questions), args.timeout
            )
        except ValueError as err:
            print(f"warning: {err}", file=sys.stderr)
    if canary is not None and (args.promote_on_pass if not misses else args.abort_on_fail):
        try:
            done = settle_canary(args.app_url, args.admin_key, canary.tenant, not misses, args.timeout)
            print(f"{canary.adapter}: {done}")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 1 if misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
