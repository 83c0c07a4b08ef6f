"""The sync job end to end on real Milvus Lite and MiniLM: REST CRM, SQL (SQLite, PostgreSQL), safety."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from fastapi import FastAPI, Request

from cs_testing.crm_emulator import CrmState, create_crm_app, serve_in_thread
from cs_testing.knowledge import sync_complete
from knowledge_sync.__main__ import main
from knowledge_sync.runner import ExitCode, RunOptions, SourceOutcome, StoreTarget, run_sources
from knowledge_sync.sources import SourcesFile
from services.config import ChunkingConfig, EmbedderConfig, RetrieverConfig
from services.embedder import EmbeddingBackend, load_embedding_backend
from services.knowledge.documents import KnowledgeDocument
from services.knowledge.ingest import SourceBatch, sync_source
from services.knowledge.store import MilvusKnowledgeStore
from services.schemas import Embedding
from tests.conftest import embedder_args, llm_args, orchestrator_args, retriever_args
from tests.postgres_server import postgres_server

pytestmark = pytest.mark.integration


class CountingEncoder:
    """The real backend, recording every passage it embeds; optionally failing after N batches."""

    def __init__(self, backend: EmbeddingBackend) -> None:
        self._backend = backend
        self.max_length = backend.max_length
        self.encoded: list[str] = []
        self.fail_after_batches: int | None = None

    def encode(self, texts: list[str], kind: Any) -> list[Embedding]:
        if self.fail_after_batches is not None:
            if self.fail_after_batches == 0:
                raise RuntimeError("embedder crashed mid-run")
            self.fail_after_batches -= 1
        self.encoded.extend(texts)
        return self._backend.encode(texts, kind)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self._backend.count_tokens(texts)


@pytest.fixture(scope="module")
def backend(minilm_dir: Path) -> EmbeddingBackend:
    return load_embedding_backend(EmbedderConfig.model_validate(embedder_args(minilm_dir)))


@pytest.fixture()
def encoder(backend: EmbeddingBackend) -> CountingEncoder:
    return CountingEncoder(backend)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[MilvusKnowledgeStore]:
    config = RetrieverConfig.model_validate(retriever_args(tmp_path / "kb.db"))
    store = MilvusKnowledgeStore(config, dimension=384, has_sparse=False)
    yield store
    store.close()


def search(store: MilvusKnowledgeStore, backend: EmbeddingBackend, query: str, tenant: str = "lumen") -> list[str]:
    [embedding] = backend.encode([query], "query")
    return [h.chunk.text for h in store.search(tenant, query, embedding, 50).hits]


def sources(*configs: dict[str, Any], tenant: str = "lumen") -> SourcesFile:
    return SourcesFile.model_validate({"tenants": {tenant: {"sources": list(configs)}}})


def run(store: MilvusKnowledgeStore, encoder: CountingEncoder, file: SourcesFile, **options: Any) -> SourceOutcome:
    [outcome] = run_sources(file, StoreTarget(store, encoder), RunOptions(progress=False, **options))
    return outcome


# -- REST CRM ---------------------------------------------------------------------------------


@pytest.fixture()
def crm(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, CrmState]]:
    state = CrmState()
    for i in range(12):
        state.put(f"p{i}", f"Policy {i}", f"Policy {i}: orders of category {i} ship within {i + 1} days.")
    monkeypatch.setenv("CRM_TOKEN", state.token)
    with serve_in_thread(create_crm_app(state)) as url:
        yield url, state


def crm_source(url: str) -> dict[str, Any]:
    return {
        "name": "crm",
        "type": "rest",
        "url": f"{url}/api/policies",
        "auth": {"type": "bearer", "token_env": "CRM_TOKEN"},
        "pagination": {"style": "page", "page_size": 5},
        "records_path": "data",
        "updated_since_param": "updated_since",
        "fields": {"doc_id": "id", "title": "name", "text": "content.body", "updated_at": "modified"},
        "deleted": {"path": "status", "values": ["archived"]},
        "backoff_s": 0,
    }


def test_crm_changes_are_pulled_incrementally_and_only_changed_chunks_embedded(
    crm: tuple[str, CrmState], store: MilvusKnowledgeStore, encoder: CountingEncoder, backend: EmbeddingBackend
) -> None:
    url, crm_state = crm
    file = sources(crm_source(url))
    first = run(store, encoder, file)
    assert (first.mode, first.code, first.report and first.report.added) == ("complete", ExitCode.OK, 12)

    crm_state.put("p3", "Policy 3", "Policy 3: orders of category 3 now ship within 1 day, free of charge.")
    crm_state.fail_next = 2  # a 503 burst, retried
    encoder.encoded.clear()
    second = run(store, encoder, file)
    assert second.mode == "incremental" and second.report is not None
    assert (second.report.updated, second.report.added, second.report.deleted) == (1, 0, 0)
    assert encoder.encoded == ["Policy 3\nPolicy 3: orders of category 3 now ship within 1 day, free of charge."]
    texts = search(store, backend, "category 3 shipping")
    assert "Policy 3: orders of category 3 now ship within 1 day, free of charge." in texts
    assert "Policy 3: orders of category 3 ship within 4 days." not in texts

    crm_state.archive("p7")
    third = run(store, encoder, file)
    assert third.report is not None and third.report.deleted == 1
    assert not [t for t in search(store, backend, "category 7 shipping") if "category 7" in t]
    assert len(search(store, backend, "orders ship")) == 11


def test_a_refused_token_changes_nothing(
    crm: tuple[str, CrmState],
    store: MilvusKnowledgeStore,
    encoder: CountingEncoder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    file = sources(crm_source(crm[0]))
    run(store, encoder, file)
    before = store.tenant_state("lumen")
    monkeypatch.setenv("CRM_TOKEN", "revoked")
    outcome = run(store, encoder, file, full=True)
    assert outcome.code == ExitCode.SOURCE_FAILED and "refused the credentials (401)" in str(outcome.error)
    assert store.tenant_state("lumen") == before


# -- atomicity --------------------------------------------------------------------------------


def policies(version: str, count: int = 80) -> list[KnowledgeDocument]:
    return [
        KnowledgeDocument(doc_id=f"d{i}", title=f"Rule {i}", text=f"Rule {i} version {version}: returns take {i} days.")
        for i in range(count)
    ]


def test_an_interrupted_run_leaves_the_previous_knowledge_searchable(
    store: MilvusKnowledgeStore,
    encoder: CountingEncoder,
    backend: EmbeddingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.knowledge import ingest as pipeline

    monkeypatch.setattr(pipeline, "EMBED_BATCH", 32)
    sync_complete(store, encoder, "lumen", "kb", policies("A"))
    generation = store.tenant_state("lumen").generation
    everything = "returns take days"

    encoder.fail_after_batches = 1  # dies after staging the first 32 of 80 new chunks
    with pytest.raises(RuntimeError, match="embedder crashed"):
        sync_complete(store, encoder, "lumen", "kb", policies("B"))
    texts = search(store, backend, everything)
    assert len(texts) == 50 and all("version A" in t for t in texts)
    assert len(store.live_chunks("lumen", "kb")) == 80

    # Dying after every chunk is staged and retired, just before the commit, is no different.
    encoder.fail_after_batches = None
    real_commit = store.commit

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    store.commit = crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        sync_complete(store, encoder, "lumen", "kb", policies("B"))
    store.commit = real_commit  # type: ignore[method-assign]
    assert all("version A" in t for t in search(store, backend, everything))
    assert store.tenant_state("lumen").generation == generation

    # The next run cleans up and lands exactly the new version.
    report = sync_complete(store, encoder, "lumen", "kb", policies("B"))
    assert (report.updated, report.generation) == (80, generation + 1)
    assert len(store.live_chunks("lumen", "kb")) == 80
    texts = search(store, backend, everything)
    assert all("version B" in t for t in texts)


def test_rerunning_the_same_pull_changes_nothing(store: MilvusKnowledgeStore, encoder: CountingEncoder) -> None:
    sync_complete(store, encoder, "lumen", "kb", policies("A", 10))
    encoder.encoded.clear()
    again = sync_complete(store, encoder, "lumen", "kb", policies("A", 10))
    assert (again.unchanged, again.chunks_embedded, encoder.encoded) == (10, 0, [])
    assert again.generation == store.tenant_state("lumen").generation  # no new generation, caches hold


def test_rejected_records_keep_their_stored_version(store: MilvusKnowledgeStore, encoder: CountingEncoder) -> None:
    sync_complete(store, encoder, "lumen", "kb", policies("A", 4))
    batch = SourceBatch(complete=True, documents=policies("A", 4)[:3], kept_doc_ids=["d3"])
    report = sync_source(store, encoder, "lumen", "kb", batch, ChunkingConfig())
    assert (report.deleted, report.unchanged) == (0, 3)
    assert {c.doc_id for c in store.live_chunks("lumen", "kb")} == {"d0", "d1", "d2", "d3"}


# -- SQL --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'erp.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_sql_source_with_a_watermark(
    database_url: str,
    store: MilvusKnowledgeStore,
    encoder: CountingEncoder,
    backend: EmbeddingBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = sa.create_engine(database_url)
    start = datetime(2026, 3, 1, 8, 0)
    with engine.begin() as db:
        db.execute(sa.text("DROP TABLE IF EXISTS erp_policies"))
        db.execute(
            sa.text(
                "CREATE TABLE erp_policies (code VARCHAR(40) PRIMARY KEY, title VARCHAR(200), body TEXT, "
                "region VARCHAR(20), changed_at TIMESTAMP)"
            )
        )
        for i in range(6):
            db.execute(
                sa.text("INSERT INTO erp_policies VALUES (:c, :t, :b, 'cn', :u)"),
                {"c": f"SLA-{i}", "t": f"Warehouse {i} SLA", "b": f"Warehouse {i} dispatches in {i + 1} days.",
                 "u": start + timedelta(hours=i)},
            )  # fmt: skip
    monkeypatch.setenv("ERP_DATABASE_URL", database_url)
    source = {
        "name": "erp",
        "type": "sql",
        "url_env": "ERP_DATABASE_URL",
        "query": "SELECT code, title, body, region, changed_at FROM erp_policies",
        "watermark_column": "changed_at",
        "fields": {
            "doc_id": "code",
            "title": "title",
            "text": "body",
            "category": "region",
            "updated_at": "changed_at",
        },
    }
    file = sources(source)
    first = run(store, encoder, file)
    assert first.report is not None and (first.mode, first.report.added) == ("complete", 6)

    with engine.begin() as db:
        db.execute(
            sa.text("UPDATE erp_policies SET body = :b, changed_at = :u WHERE code = 'SLA-2'"),
            {"b": "Warehouse 2 dispatches the same day.", "u": start + timedelta(days=1)},
        )
    encoder.encoded.clear()
    second = run(store, encoder, file)
    assert second.mode == "incremental" and second.report is not None
    assert (second.report.updated, second.report.added) == (1, 0)
    assert encoder.encoded == ["Warehouse 2 SLA\nWarehouse 2 dispatches the same day."]
    assert "Warehouse 2 dispatches the same day." in search(store, backend, "warehouse 2 dispatch")

    with engine.begin() as db:
        db.execute(sa.text("DELETE FROM erp_policies WHERE code = 'SLA-4'"))
    third = run(store, encoder, file, full=True)  # hard deletions show in complete pulls
    assert third.report is not None and third.report.deleted == 1
    assert {c.doc_id for c in store.live_chunks("lumen", "erp")} == {"SLA-0", "SLA-1", "SLA-2", "SLA-3", "SLA-5"}
    engine.dispose()


def test_sql_query_errors_name_the_source(
    store: MilvusKnowledgeStore, encoder: CountingEncoder, tmp_path: Path
) -> None:
    source = {"name": "erp", "type": "sql", "url": f"sqlite:///{tmp_path / 'x.db'}", "query": "SELECT * FROM nowhere"}
    outcome = run(store, encoder, sources(source))
    assert outcome.code == ExitCode.SOURCE_FAILED and "source erp: " in str(outcome.error)
    assert "nowhere" in str(outcome.error)


# -- the CLI with a sources file ---------------------------------------------------------------


def test_cli_runs_a_sources_file_and_publishes_metrics(
    tmp_path: Path, minilm_dir: Path, crm: tuple[str, CrmState], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "serve.yaml"
    args = {
        "embedder": embedder_args(minilm_dir),
        "retriever": retriever_args(tmp_path / "cli-kb.db"),
        "llm": llm_args(tmp_path / "unused-model"),
        "orchestrator": orchestrator_args(),
    }
    config.write_text(
        yaml.safe_dump({"applications": [{"name": "cs", "import_path": "services.app:build_app", "args": args}]})
    )
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "warranty.md").write_text("# Warranty\n\nTwo years on furniture.\n")
    file = tmp_path / "sources.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "lumen": {"sources": [crm_source(crm[0]), {"name": "files", "type": "files", "path": "policies"}]}
                }
            }
        )
    )
    pushed: list[bytes] = []
    gateway = FastAPI()

    @gateway.put("/metrics/job/{job}")
    async def push(job: str, request: Request) -> dict[str, str]:
        pushed.append(await request.body())
        return {}

    metrics = tmp_path / "sync.prom"
    with serve_in_thread(gateway) as gateway_url:
        code = main(["--sources", str(file), "--config", str(config), "--no-progress",
                     "--metrics-file", str(metrics), "--pushgateway", gateway_url])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "lumen/crm (complete): 12 added" in out and "lumen/files (complete): 1 added" in out
    text = metrics.read_text()
    assert 'cs_knowledge_sync_records{outcome="added",source="crm",tenant="lumen"} 12.0' in text
    assert 'cs_knowledge_sync_success{source="files",tenant="lumen"} 1.0' in text
    assert "cs_knowledge_sync_last_success_timestamp_seconds" in text
    assert len(pushed) == 1 and b"cs_knowledge_sync_records" in pushed[0]
