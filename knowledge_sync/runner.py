"""One knowledge-sync job: every configured source of every tenant, each as an atomic run.

A source is pulled (incrementally from its stored cursor when it can, completely on the
first run, with ``--full``, or when its last complete pull is older than
``full_sync_every_hours``), mapped and validated into a batch, and applied to a
*target*: the Milvus store directly (:class:`StoreTarget`), or a running app through its
admin API (:class:`AppTarget`), which a Milvus Lite file needs while the app holds it.
A source that fails changes nothing and does not stop the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from tqdm import tqdm

from knowledge_sync.connectors import Connector, SourceError
from knowledge_sync.records import RecordMapper, Reject
from knowledge_sync.sources import (
    FilesSource,
    RestSource,
    SourceConfig,
    SourcesFile,
    SourcesFileError,
    SqlSource,
)
from services.config import ChunkingConfig
from services.errors import ServiceError
from services.knowledge.ingest import MassDeleteError, PassageEncoder, SourceBatch, SyncReport, sync_source
from services.knowledge.store import MilvusKnowledgeStore, SourceState, TenantState


class ExitCode(IntEnum):
    """Exit status of ``cs-knowledge-sync``, worst outcome wins."""

    OK = 0
    REJECTS = 1  # every source synced, some records were rejected (see the rejects report)
    USAGE = 2  # bad arguments or sources file
    SOURCE_FAILED = 3  # a source system failed or refused; its knowledge is unchanged
    TARGET_FAILED = 4  # Milvus or the app failed; the failed runs changed nothing


class TargetError(RuntimeError):
    """The knowledge base (or the app in front of it) failed or refused."""


class SyncTarget(Protocol):
    """Where batches are applied."""

    def state(self, tenant: str) -> TenantState:
        """The tenant's committed state (source cursors)."""
        ...

    def apply(
        self,
        tenant: str,
        source: str,
        batch: SourceBatch,
        chunking: ChunkingConfig,
        on_embedded: Callable[[int, int], None] | None,
        max_delete_fraction: float | None = None,
    ) -> SyncReport:
        """Apply one batch atomically; refuse a complete one deleting more than ``max_delete_fraction``."""
        ...


class StoreTarget:
    """Applies batches to Milvus directly, embedding with the Embedder's own backend."""

    def __init__(self, store: MilvusKnowledgeStore, embedder: PassageEncoder) -> None:
        self._store = store
        self._embedder = embedder

    def state(self, tenant: str) -> TenantState:
        """Read the tenant's state from the store."""
        try:
            return self._store.tenant_state(tenant)
        except ServiceError as err:
            raise TargetError(err.message) from err

    def apply(
        self,
        tenant: str,
        source: str,
        batch: SourceBatch,
        chunking: ChunkingConfig,
        on_embedded: Callable[[int, int], None] | None,
        max_delete_fraction: float | None = None,
    ) -> SyncReport:
        """Run the pipeline here."""
        try:
            return sync_source(
                self._store, self._embedder, tenant, source, batch, chunking,
                on_embedded=on_embedded, max_delete_fraction=max_delete_fraction,
            )  # fmt: skip
        except MassDeleteError as err:
            raise SourceError(err.message) from err
        except ServiceError as err:
            raise TargetError(err.message) from err


class AppTarget:
    """Applies batches through a running app's admin API; its Retriever runs the pipeline."""

    def __init__(self, app_url: str, admin_key: str, *, timeout_s: float = 3600) -> None:
        import httpx

        self._client = httpx.Client(base_url=app_url.rstrip("/"), headers={"X-API-Key": admin_key}, timeout=timeout_s)

    def state(self, tenant: str) -> TenantState:
        """GET /admin/knowledge/{tenant}."""
        return TenantState.model_validate(self._request("GET", f"/admin/knowledge/{tenant}"))

    def apply(
        self,
        tenant: str,
        source: str,
        batch: SourceBatch,
        chunking: ChunkingConfig,
        on_embedded: Callable[[int, int], None] | None,
        max_delete_fraction: float | None = None,
    ) -> SyncReport:
        """PUT /admin/knowledge/{tenant}/sources/{source}."""
        body = batch.model_dump(mode="json") | {"chunking": chunking.model_dump()}
        if max_delete_fraction is None:
            body["allow_mass_delete"] = True
        else:
            body["max_delete_fraction"] = max_delete_fraction
        return SyncReport.model_validate(self._request("PUT", f"/admin/knowledge/{tenant}/sources/{source}", body))

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            reply = self._client.request(method, path, json=body)
        except httpx.HTTPError as err:
            raise TargetError(f"the app at {self._client.base_url} is unreachable: {err}") from err
        if reply.status_code != 200:
            try:
                error = reply.json()["error"]
                message, code = str(error["message"]), error.get("code")
            except (ValueError, KeyError, TypeError):
                message, code = reply.text[:500], None
            if code == MassDeleteError.code:
                raise SourceError(message)  # the pull, not the app, is what is wrong
            raise TargetError(f"the app answered {reply.status_code}: {message}")
        return reply.json()


@dataclass
class SourceOutcome:
    """How one source's run ended."""

    tenant: str
    source: str
    mode: str = "complete"
    report: SyncReport | None = None
    rejects: list[Reject] = field(default_factory=list)
    error: str | None = None
    code: ExitCode = ExitCode.OK
    last_success: float = 0


@dataclass
class RunOptions:
    """Choices of one job run."""

    tenants: list[str] | None = None
    sources: list[str] | None = None
    full: bool = False
    allow_mass_delete: bool = False
    progress: bool = True


def open_connector(config: SourceConfig, state: SourceState) -> Connector:
    """The connector of a source config."""
    if isinstance(config, RestSource):
        from knowledge_sync.connectors.rest import RestConnector

        return RestConnector(config)
    if isinstance(config, SqlSource):
        from knowledge_sync.connectors.sql import SqlConnector

        return SqlConnector(config, cursor_is_datetime=state.cursor_is_datetime)
    if isinstance(config, FilesSource):
        from knowledge_sync.connectors.files import FilesConnector

        return FilesConnector(config)
    raise TypeError(f"no connector for {type(config).__name__}")


def run_sources(sources: SourcesFile, target: SyncTarget, options: RunOptions) -> list[SourceOutcome]:
    """Sync every selected source; failures are recorded per source, never raised."""
    outcomes = []
    for tenant, tenant_sources in sources.tenants.items():
        if options.tenants and tenant not in options.tenants:
            continue
        for config in tenant_sources.sources:
            if options.sources and config.name not in options.sources:
                continue
            outcomes.append(_run_one(tenant, config, tenant_sources.chunking, target, options))
    return outcomes


def _run_one(
    tenant: str, config: SourceConfig, chunking: ChunkingConfig, target: SyncTarget, options: RunOptions
) -> SourceOutcome:
    outcome = SourceOutcome(tenant=tenant, source=config.name)
    try:
        previous = target.state(tenant).sources.get(config.name, SourceState())
        outcome.last_success = previous.last_success
        connector = open_connector(config, previous)
        incremental = (
            connector.incremental
            and not options.full
            and previous.cursor is not None
            and time.time() - previous.last_full_sync < config.full_sync_every_hours * 3600
        )
        outcome.mode = "incremental" if incremental else "complete"
        mapper = RecordMapper(tenant, config, cursor_path=connector.cursor_path)
        records = connector.pull(previous.cursor if incremental else None)
        label = f"{tenant}/{config.name}"
        for record in tqdm(records, desc=f"{label} pull", unit=" records", disable=not options.progress):
            mapper.add(record)
        outcome.rejects = mapper.rejects
        batch = mapper.batch(complete=not incremental)
        with tqdm(desc=f"{label} embed", unit=" chunks", disable=not options.progress) as bar:

            def on_embedded(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            # Checked where the run holds its lease, against the committed state (the app's, or Milvus's).
            guard = None if incremental or options.allow_mass_delete else config.max_delete_fraction
            report = target.apply(tenant, config.name, batch, chunking, on_embedded, guard)
        outcome.report = report.model_copy(update={"rejected": len(mapper.rejects)})
        outcome.last_success = time.time()
        outcome.code = ExitCode.REJECTS if mapper.rejects else ExitCode.OK
    except (SourceError, SourcesFileError) as err:
        outcome.error, outcome.code = str(err), ExitCode.SOURCE_FAILED
    except TargetError as err:
        outcome.error, outcome.code = str(err), ExitCode.TARGET_FAILED
    return outcome


def exit_code(outcomes: list[SourceOutcome]) -> ExitCode:
    """The worst outcome."""
    return max((o.code for o in outcomes), default=ExitCode.OK)


def export_metrics(outcomes: list[SourceOutcome], *, textfile: str | None, pushgateway: str | None) -> None:
    """Publish the run's metrics for Prometheus: a node-exporter textfile and/or a Pushgateway push.

    Gauges describe the last run, as is usual for batch jobs (counters would reset with
    every process). ``cs_knowledge_sync_last_success_timestamp_seconds`` comes from the
    committed state, so a failing source keeps its last good time and can be alerted on.
    """
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

    registry = CollectorRegistry()
    labels = ["tenant", "source"]
    records = Gauge(
        "cs_knowledge_sync_records",
        "Source records by outcome in the last run.",
        [*labels, "outcome"],
        registry=registry,
    )
    chunks = Gauge("cs_knowledge_sync_chunks_embedded", "Chunks embedded in the last run.", labels, registry=registry)
    duration = Gauge(
        "cs_knowledge_sync_duration_seconds", "Seconds the last run took to apply.", labels, registry=registry
    )
    success = Gauge("cs_knowledge_sync_success", "1 if the last run committed, else 0.", labels, registry=registry)
    last_success = Gauge(
        "cs_knowledge_sync_last_success_timestamp_seconds", "Unix time of the last commit.", labels, registry=registry
    )
    generation = Gauge(
        "cs_knowledge_sync_generation", "Knowledge-base generation of the tenant after the run.", ["tenant"],
        registry=registry,
    )  # fmt: skip
    for outcome in outcomes:
        key = (outcome.tenant, outcome.source)
        success.labels(*key).set(0 if outcome.report is None else 1)
        if outcome.last_success:
            last_success.labels(*key).set(outcome.last_success)
        report = outcome.report
        if report is None:
            continue
        for name in ("added", "updated", "deleted", "unchanged", "rejected"):
            records.labels(*key, name).set(getattr(report, name))
        chunks.labels(*key).set(report.chunks_embedded)
        duration.labels(*key).set(report.seconds)
        generation.labels(outcome.tenant).set(report.generation)
    if textfile:
        write_to_textfile(textfile, registry)
    if pushgateway:
        push_to_gateway(pushgateway, job="cs_knowledge_sync", registry=registry)
