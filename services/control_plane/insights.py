"""What shoppers asked and how it went, per tenant and period: rates, unanswered clusters, worst answers.

Every query is bounded by the tenant and the period and served by the records' (tenant,
created_at) and (tenant, outcome, created_at) indexes. Unanswered questions (fallback and
handover) are clustered by their stored embeddings: equal questions are grouped first, then
each group joins the first larger cluster whose leading question is at least
``similarity`` alike, or leads a new one. At most ``max_questions`` of the period's most
recent unanswered questions are clustered, which bounds the work whatever the period holds.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Float, and_, case, cast, func, select
from sqlalchemy.orm import Session

from services.control_plane.models import ConversationRecord, Feedback
from services.control_plane.recorder import UNANSWERED


@dataclass
class Cluster:
    """Unanswered questions that ask the same thing."""

    count: int
    examples: list[str]
    outcomes: dict[str, int]
    first_seen: str
    last_seen: str
    reply_ids: list[str] = field(default_factory=list)


def _period(start: datetime, end: datetime) -> Any:
    return and_(ConversationRecord.created_at >= start, ConversationRecord.created_at < end)


def rates(session: Session, tenant: str, start: datetime, end: datetime) -> dict[str, Any]:
    """Counts and rates of the period's replies by outcome, with satisfaction and resolution from feedback.

    ``answer_rate`` counts answers and tool actions; ``satisfaction`` is the share of rated
    replies rated helpful; ``resolution_rate`` the share of those with a verdict that were resolved.
    """
    rows = session.execute(
        select(ConversationRecord.outcome, func.count())
        .where(ConversationRecord.tenant == tenant, _period(start, end))
        .group_by(ConversationRecord.outcome)
    ).tuples()
    counts = {outcome: int(n) for outcome, n in rows}
    total = sum(counts.values())
    helpful = func.sum(case((Feedback.helpful.is_(True), 1), else_=0))
    rated = func.sum(case((Feedback.helpful.is_not(None), 1), else_=0))
    resolved = func.sum(case((Feedback.resolved.is_(True), 1), else_=0))
    judged = func.sum(case((Feedback.resolved.is_not(None), 1), else_=0))
    in_period = and_(Feedback.created_at >= start, Feedback.created_at < end)
    h, r, s, j = session.execute(
        select(helpful, rated, resolved, judged).where(Feedback.tenant == tenant, in_period)
    ).one()

    def share(part: int | None, whole: int | None) -> float | None:
        return round((part or 0) / whole, 4) if whole else None

    return {
        "replies": total,
        "by_outcome": counts,
        "answer_rate": share(counts.get("answered", 0) + counts.get("tool", 0), total),
        "fallback_rate": share(counts.get("fallback", 0), total),
        "handover_rate": share(counts.get("handover", 0), total),
        "guardrail_rate": share(counts.get("guardrail", 0), total),
        "error_rate": share(counts.get("error", 0), total),
        "rated": int(r or 0),
        "satisfaction": share(h, r),
        "resolution_rate": share(s, j),
    }


def daily(session: Session, tenant: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Replies per UTC day and outcome, oldest first: the rates over time."""
    day = func.date(ConversationRecord.created_at)
    rows = session.execute(
        select(day, ConversationRecord.outcome, func.count())
        .where(ConversationRecord.tenant == tenant, _period(start, end))
        .group_by(day, ConversationRecord.outcome)
        .order_by(day)
    ).tuples()
    days: dict[str, dict[str, int]] = {}
    for when, outcome, n in rows:
        days.setdefault(str(when), {})[outcome] = int(n)
    return [{"day": d, "replies": sum(c.values()), "by_outcome": c} for d, c in days.items()]


_NOT_WORD = re.compile(r"[\W_]+")


def _normal(question: str) -> str:
    return _NOT_WORD.sub(" ", question.casefold()).strip()


def unanswered_clusters(
    session: Session,
    tenant: str,
    start: datetime,
    end: datetime,
    *,
    similarity: float,
    max_questions: int = 5000,
    top: int = 20,
    examples: int = 3,
) -> list[Cluster]:
    """The period's unanswered questions, clustered, largest first (the ``top`` largest)."""
    rows = session.execute(
        select(
            ConversationRecord.reply_id,
            ConversationRecord.question,
            ConversationRecord.outcome,
            ConversationRecord.created_at,
            ConversationRecord.question_vector,
        )
        .where(
            ConversationRecord.tenant == tenant,
            ConversationRecord.outcome.in_(UNANSWERED),
            _period(start, end),
        )
        .order_by(ConversationRecord.created_at.desc())
        .limit(max_questions)
    ).tuples()
    groups: dict[str, list[tuple[str, str, str, datetime, bytes | None]]] = {}
    for row in rows:
        groups.setdefault(_normal(row[1]) or row[1], []).append(row)
    ordered = sorted(groups.values(), key=len, reverse=True)
    clusters: list[list[list[tuple[str, str, str, datetime, bytes | None]]]] = []
    # Leading vectors in one preallocated matrix: each group is scored against all leaders at once.
    leaders: np.ndarray | None = None
    leader_of: list[int] = []  # cluster index of each leader row
    for group in ordered:
        raw = next((r[4] for r in group if r[4]), None)
        vector = np.frombuffer(raw, dtype=np.float16).astype(np.float32) if raw else None
        if vector is not None and leaders is not None and vector.shape[0] != leaders.shape[1]:
            vector = None  # written by another embedder: grouped by its text only
        joined = None
        if vector is not None and leader_of:
            assert leaders is not None
            scores = leaders[: len(leader_of)] @ vector
            best = int(np.argmax(scores))
            if scores[best] >= similarity:
                joined = leader_of[best]
        if joined is not None:
            clusters[joined].append(group)
            continue
        clusters.append([group])
        if vector is not None:
            if leaders is None:
                leaders = np.empty((len(ordered), vector.shape[0]), dtype=np.float32)
            leaders[len(leader_of)] = vector
            leader_of.append(len(clusters) - 1)
    result = [_cluster(c, examples) for c in clusters]
    result.sort(key=lambda c: c.count, reverse=True)
    return result[:top]


def _cluster(groups: list[list[tuple[str, str, str, datetime, bytes | None]]], examples: int) -> Cluster:
    rows = [r for g in groups for r in g]
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r[2]] = outcomes.get(r[2], 0) + 1
    times = [r[3] for r in rows]
    return Cluster(
        count=len(rows),
        examples=[g[0][1] for g in groups[:examples]],
        outcomes=outcomes,
        first_seen=min(times).isoformat(),
        last_seen=max(times).isoformat(),
        reply_ids=[r[0] for r in rows[:examples]],
    )


def worst_rated(session: Session, tenant: str, start: datetime, end: datetime, limit: int = 20) -> list[dict[str, Any]]:
    """Replies rated unhelpful in the period: most unhelpful verdicts, then largest share, then lowest confidence.

    Feedback is few next to records: it is aggregated first (by the feedback's (tenant,
    created_at) index), and only the replies it names are read.
    """
    unhelpful = func.sum(case((Feedback.helpful.is_(False), 1), else_=0)).label("unhelpful")
    rated = func.count(Feedback.id).label("rated")
    verdicts = (
        select(Feedback.reply_id, unhelpful, rated)
        .where(Feedback.tenant == tenant, Feedback.created_at >= start, Feedback.created_at < end)
        .group_by(Feedback.reply_id)
        .having(func.sum(case((Feedback.helpful.is_(False), 1), else_=0)) > 0)
        .subquery()
    )
    query = (
        select(
            ConversationRecord.reply_id,
            ConversationRecord.question,
            ConversationRecord.answer,
            ConversationRecord.outcome,
            ConversationRecord.confidence,
            ConversationRecord.created_at,
            verdicts.c.unhelpful,
            verdicts.c.rated,
        )
        .join(verdicts, verdicts.c.reply_id == ConversationRecord.reply_id)
        .where(ConversationRecord.tenant == tenant)
        .order_by(
            verdicts.c.unhelpful.desc(),
            (cast(verdicts.c.unhelpful, Float) / verdicts.c.rated).desc(),
            ConversationRecord.confidence,
        )
        .limit(limit)
    )
    return [
        {
            "reply_id": r.reply_id,
            "question": r.question,
            "answer": r.answer,
            "outcome": r.outcome,
            "confidence": r.confidence,
            "created_at": r.created_at.isoformat(),
            "unhelpful": int(r.unhelpful),
            "rated": int(r.rated),
        }
        for r in session.execute(query)
    ]


# --- exports ------------------------------------------------------------------------------------


def gap_report(clusters: Iterable[Cluster], fmt: str) -> str:
    """The knowledge-gap report for the knowledge owner: one row (CSV) or line (JSONL) per cluster."""
    items = list(clusters)
    if fmt == "jsonl":
        return "".join(json.dumps(_gap_row(c), ensure_ascii=False) + "\n" for c in items)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["count", "examples", "fallback", "handover", "first_seen", "last_seen"])
    writer.writeheader()
    for c in items:
        row = _gap_row(c)
        writer.writerow(row | {"examples": " | ".join(row["examples"])})
    return out.getvalue()


def _gap_row(cluster: Cluster) -> dict[str, Any]:
    row = asdict(cluster)
    outcomes = row.pop("outcomes")
    row.pop("reply_ids")
    return row | {name: outcomes.get(name, 0) for name in UNANSWERED}


def alpaca_records(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Reviewed question/answer pairs as the alpaca records ``cs-train-adapter`` trains on."""
    return [{"instruction": q, "input": "", "output": a} for q, a in pairs]
