"""Knowledge-sync throughput: records/second for a paginated CRM source into Milvus Lite.

Run (after ``scripts/bootstrap.sh cpu,devmodels,dev`` and ``cs-fetch-models``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.knowledge_sync --records 10000

It serves an emulated CRM API on localhost (bilingual policy records of 1 to 3 short
paragraphs, like FAQ entries), then times three runs of the real job (REST connector, token-bounded chunking,
MiniLM embedding on the CPU, Milvus Lite writes, atomic commit): the first complete
sync, an incremental sync with 1% of the records changed, and a forced complete re-pull
where nothing changed (hash comparison only).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from benchmarks.common import table, write_report
from cs_testing.crm_emulator import CrmState, create_crm_app, serve_in_thread
from knowledge_sync.runner import RunOptions, StoreTarget, run_sources
from knowledge_sync.sources import SourcesFile
from services.config import EmbedderConfig, RetrieverConfig
from services.embedder import load_embedding_backend
from services.knowledge.store import MilvusKnowledgeStore

_EN = [
    "Items can be returned within {n} days of delivery if unused and in the original packaging.",
    "Orders above {n} yuan ship free; remote regions may take two extra days.",
    "Refunds go back to the original payment method within {n} working days after we receive the item.",
    "Members earn {n} points per order; points expire at the end of the following year.",
    "Large furniture is delivered by appointment; the driver calls {n} hours before arrival.",
]
_ZH = [
    "签收后{n}天内，商品未使用且包装完好，可申请无理由退货。",
    "订单满{n}元包邮，偏远地区可能多需两天。",
    "收到退货后{n}个工作日内原路退款。",
    "会员每单可得{n}积分，积分于次年年底过期。",
    "大件家具需预约送货，司机会在到达前{n}小时来电。",
]


def _record_text(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(1, 3)):
        pool = _ZH if rng.random() < 0.5 else _EN
        sentences = [rng.choice(pool).format(n=rng.randint(1, 99)) for _ in range(rng.randint(1, 4))]
        paragraphs.append(("" if pool is _ZH else " ").join(sentences))
    return "\n\n".join(paragraphs)


def main() -> None:
    """Run the benchmark and print one line per run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--model", default="models/all-MiniLM-L6-v2")
    parser.add_argument("--page-size", type=int, default=500)
    args = parser.parse_args()

    rng = random.Random(7)
    crm = CrmState()
    for i in range(args.records):
        crm.put(f"rec-{i:05d}", f"Policy {i}", _record_text(rng))
    os.environ["CRM_TOKEN"] = crm.token
    embedder = load_embedding_backend(
        EmbedderConfig(model=args.model, family="dense", pooling_method="mean", device="cpu", max_length=256)
    )
    with tempfile.TemporaryDirectory() as tmp, serve_in_thread(create_crm_app(crm)) as url:
        store = MilvusKnowledgeStore(
            RetrieverConfig(milvus_uri=str(Path(tmp) / "kb.db")), dimension=embedder.dimension, has_sparse=False
        )
        sources = SourcesFile.model_validate(
            {"tenants": {"bench": {"sources": [{
                "name": "crm", "type": "rest", "url": f"{url}/api/policies",
                "auth": {"type": "bearer", "token_env": "CRM_TOKEN"},
                "pagination": {"style": "page", "page_size": args.page_size}, "records_path": "data",
                "updated_since_param": "updated_since",
                "fields": {"doc_id": "id", "title": "name", "text": "content.body", "updated_at": "modified"},
            }]}}}
        )  # fmt: skip
        target = StoreTarget(store, embedder)
        rows: list[list[object]] = []

        def timed(label: str, **options: bool) -> None:
            started = time.perf_counter()
            [outcome] = run_sources(sources, target, RunOptions(progress=False, **options))
            seconds = time.perf_counter() - started
            report = outcome.report
            assert report is not None, outcome.error
            records = report.added + report.updated + report.unchanged + report.deleted
            print(
                f"{label:<34} {records:>6} records {report.chunks_embedded:>6} chunks embedded "
                f"{seconds:7.1f} s ({seconds - report.seconds:5.1f} s pulling) {records / seconds:7.0f} records/s",
                flush=True,
            )
            rows.append([label, records, report.chunks_embedded, seconds, seconds - report.seconds, records / seconds])

        timed("first complete sync")
        for i in rng.sample(range(args.records), args.records // 100):
            crm.put(f"rec-{i:05d}", f"Policy {i}", _record_text(rng))
        timed("incremental, 1% changed")
        timed("complete re-pull, nothing changed", full=True)
        store.close()
    header = ["run", "records", "chunks embedded", "seconds", "of which pulling s", "records/s"]
    sections = [
        f"Emulated paginated CRM over HTTP ({args.page_size} per page), bilingual FAQ-sized records, "
        f"embedder `{Path(args.model).name}` on the CPU, Milvus Lite.\n\n" + table(header, rows)
    ]
    command = f"python -m benchmarks.knowledge_sync --records {args.records}"
    write_report("knowledge_sync", "Knowledge-sync throughput", command, sections, {})


if __name__ == "__main__":
    main()
