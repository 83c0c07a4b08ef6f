"""Insights queries over many conversation records: each query's latency on SQLite and PostgreSQL.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev``)::

    .venv/bin/python -m benchmarks.insights --records 100000
    .venv/bin/python -m benchmarks.insights --records 100000 --url postgresql+psycopg://postgres@127.0.0.1:5432/test

It fills a fresh store (the real schema, migrated by Alembic) with ``--records`` records of
one tenant over 30 days, plus as many again of a second tenant (an index must keep them
apart), then times each query of ``GET /admin/tenants/<t>/insights`` over the 30 days,
``--rounds`` times: the rates, the rates per day, the unanswered-question clustering
(with 384-dimensional vectors, as the dev embedder writes) and the worst-rated answers.
Records: 72% answered, 15% fallback, 7% handover, 3% guardrail, 2% tool, 1% error; one in
ten rated. Unanswered questions are paraphrases of 300 topics (vectors near each topic's).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import table, write_report
from services.control_plane import insights, schema
from services.control_plane.models import ConversationRecord, Feedback
from services.control_plane.store import ControlPlaneStore

OUTCOMES = [("answered", 72), ("fallback", 15), ("handover", 7), ("guardrail", 3), ("tool", 2), ("error", 1)]
DIMENSIONS = 384
TOPICS = 300


def fill(store: ControlPlaneStore, tenant: str, records: int, rng: random.Random, end: datetime) -> None:
    """Insert ``records`` records (and their feedback) in batches, by the ORM's bulk insert."""
    topics = np.random.default_rng(rng.randint(0, 2**31)).normal(size=(TOPICS, DIMENSIONS)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    names, weights = zip(*OUTCOMES, strict=True)
    batch: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    for n in range(records):
        outcome = rng.choices(names, weights)[0]
        topic = rng.randrange(TOPICS)
        vector = None
        if outcome in ("fallback", "handover"):
            noisy = topics[topic] + np.random.default_rng(n).normal(scale=0.015, size=DIMENSIONS).astype(np.float32)
            vector = (noisy / np.linalg.norm(noisy)).astype(np.float16).tobytes()
        reply_id = f"{tenant}-{n:07d}"
        batch.append(
            {
                "reply_id": reply_id, "tenant": tenant, "user_hash": f"{rng.getrandbits(64):016x}",
                "session_id": f"s{n // 4}", "question": f"Question about topic {topic}, asked as variant {n % 7}?",
                "answer": "An answer of a few sentences." * 3, "sources": [], "confidence": rng.random(),
                "intent": "policy_question", "outcome": outcome, "adapter": None, "cached": False,
                "latency_ms": rng.uniform(300, 9000), "question_vector": vector,
                "created_at": end - timedelta(seconds=rng.uniform(0, 30 * 86400)),
            }
        )  # fmt: skip
        if rng.random() < 0.1:
            feedback.append(
                {
                    "reply_id": reply_id, "tenant": tenant, "user_hash": "h", "helpful": rng.random() < 0.7,
                    "resolved": rng.random() < 0.6, "created_at": batch[-1]["created_at"],
                }
            )  # fmt: skip
        if len(batch) == 5000 or n == records - 1:
            with store.session() as session:
                session.execute(ConversationRecord.__table__.insert(), batch)
                if feedback:
                    session.execute(Feedback.__table__.insert(), feedback)
            batch, feedback = [], []


def timed(query: Callable[[], Any], rounds: int) -> tuple[list[float], Any]:
    """Seconds of each round, and the last result."""
    seconds, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = query()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def main() -> None:
    """Fill the store, time the queries, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="Records of the measured tenant.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--url", help="A PostgreSQL database to fill (its tables are dropped after); default SQLite.")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="insights-bench-"))
    url = args.url or f"sqlite:///{workdir / 'control-plane.db'}"
    store = ControlPlaneStore(url, timeout_s=60)
    if schema.current_revision(store.engine):
        schema.downgrade(store.engine)
    store.migrate()
    rng = random.Random(7)
    end = datetime.now(UTC)
    started = time.perf_counter()
    fill(store, "lumen", args.records, rng, end)
    fill(store, "voltmart", args.records, rng, end)
    filled = time.perf_counter() - started
    start = end - timedelta(days=30)
    rows = []
    total: list[float] = [0.0] * args.rounds
    queries: dict[str, Callable[[Any], Any]] = {
        "rates": lambda s: insights.rates(s, "lumen", start, end),
        "rates per day": lambda s: insights.daily(s, "lumen", start, end),
        "unanswered clusters": lambda s: insights.unanswered_clusters(s, "lumen", start, end, similarity=0.85),
        "worst rated": lambda s: insights.worst_rated(s, "lumen", start, end),
    }
    results: dict[str, Any] = {}
    for name, query in queries.items():

        def one(query: Callable[[Any], Any] = query) -> Any:
            with store.session() as session:
                return query(session)

        seconds, results[name] = timed(one, args.rounds)
        total = [t + s for t, s in zip(total, seconds, strict=True)]
        rows.append((name, min(seconds) * 1000, statistics.median(seconds) * 1000, max(seconds) * 1000))
    rows.append(("whole insights call", min(total) * 1000, statistics.median(total) * 1000, max(total) * 1000))
    backend = "PostgreSQL" if store.url.startswith("postgresql") else "SQLite"
    clusters = results["unanswered clusters"]
    sections = [
        f"{backend}; {args.records:,} records of the measured tenant and {args.records:,} of another, over 30 days "
        f"(filled in {filled:.0f} s); {args.rounds} rounds of each query over the 30 days.",
        table(["query", "min ms", "median ms", "max ms"], rows),
        f"Replies counted: {results['rates']['replies']:,}; clusters: the largest holds {clusters[0].count} "
        f"questions, {len(clusters)} shown; days: {len(results['rates per day'])}.",
    ]
    if args.url:
        schema.downgrade(store.engine)
    store.close()
    name = f"insights-{backend.lower()}"
    write_report(name, f"Insights over {args.records:,} records ({backend})", f"python -m benchmarks.insights "
                 f"--records {args.records}" + (" --url <PostgreSQL>" if args.url else ""), sections, {})  # fmt: skip


if __name__ == "__main__":
    main()
