r"""Command line of the knowledge sync: pull CRM/ERP/file sources into the knowledge base.

Every source in a sources file (see :mod:`knowledge_sync.sources`)::

    cs-knowledge-sync --sources sources.yaml --config serve_config.yaml

One file or folder, without a sources file::

    cs-knowledge-sync --config serve_config.dev.yaml --tenant lumen \\
        --source sample-kb --path knowledge_sync/samples/lumen_home.json

``--config`` opens Milvus directly, with the embedder of the Serve config the app runs
with. A Milvus Lite file admits one process: while the app runs, send the pulls to it
instead (``--app-url http://127.0.0.1:8000 --admin-key ...``); its Retriever deployment
runs the same pipeline and the assistant answers from the new policies at once.

Exit status: 0 synced; 1 synced with rejected records; 2 usage or sources-file error;
3 a source failed (its knowledge is unchanged); 4 Milvus or the app failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from knowledge_sync.runner import (
    AppTarget,
    ExitCode,
    RunOptions,
    SourceOutcome,
    StoreTarget,
    SyncTarget,
    TargetError,
    exit_code,
    export_metrics,
    run_sources,
)
from knowledge_sync.sources import (
    FilesSource,
    SourcesFile,
    SourcesFileError,
    TenantSources,
    load_sources,
)
from services.config import SOURCE_PATTERN, TENANT_PATTERN, AppConfig, ServiceSettings, load_app_config
from services.errors import ServiceError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cs-knowledge-sync",
        description="Pull knowledge sources (REST, SQL, files) into the tenants' knowledge bases.",
        epilog="Exit status: 0 ok, 1 some records rejected, 2 usage, 3 a source failed, 4 Milvus or the app failed.",
    )
    what = parser.add_argument_group("what to sync")
    what.add_argument("--sources", type=Path, help="Sources file (YAML) declaring each tenant's sources.")
    what.add_argument("--path", type=Path, help="Instead of --sources: one .json/.csv/.md file or folder.")
    what.add_argument("--tenant", action="append", help="Only this tenant (repeatable); required with --path.")
    what.add_argument("--source", action="append", help="Only this source (repeatable); names the --path source.")
    where = parser.add_argument_group("where to write")
    where.add_argument("--config", type=Path, help="Serve config YAML of the app: open Milvus directly.")
    where.add_argument("--app-url", help="Sync through a running app at this URL instead of opening Milvus.")
    where.add_argument("--admin-key", default=os.environ.get("CS_ADMIN_KEY"), help="Admin key (or CS_ADMIN_KEY).")
    how = parser.add_argument_group("how")
    how.add_argument("--full", action="store_true", help="Pull every record, not only changes since the cursor.")
    how.add_argument("--allow-mass-delete", action="store_true", help="Accept pulls that delete most of a source.")
    how.add_argument("--rejects", type=Path, default=Path("knowledge-sync-rejects.jsonl"), help="Rejects report.")
    how.add_argument("--metrics-file", help="Write Prometheus metrics here (node-exporter textfile collector).")
    how.add_argument("--pushgateway", help="Push Prometheus metrics to this Pushgateway address.")
    how.add_argument("--no-progress", action="store_true", help="No progress bars (logs only).")
    return parser


def _sources(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SourcesFile:
    if bool(args.sources) == bool(args.path):
        parser.error("give exactly one of --sources (a sources file) and --path (one file or folder)")
    for tenant in args.tenant or []:
        if not re.fullmatch(TENANT_PATTERN, tenant):
            parser.error(f"--tenant {tenant!r}: use lowercase letters, digits, '-' and '_' (max 64)")
    if args.sources:
        return load_sources(args.sources)
    if not args.tenant or len(args.tenant) != 1:
        parser.error("--path needs exactly one --tenant")
    source = (args.source or ["files"])[0]
    if not re.fullmatch(SOURCE_PATTERN, source):
        parser.error(f"--source {source!r}: use letters, digits, '.', '-' and '_' (max 64)")
    files = FilesSource(type="files", name=source, path=args.path)
    return SourcesFile(tenants={args.tenant[0]: TenantSources(sources=[files])})


def main(argv: list[str] | None = None) -> int:
    """Run one sync job and return its exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted: the source in progress is unchanged; finished sources are committed", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.config) == bool(args.app_url):
        parser.error("give exactly one of --config (direct) and --app-url (through the running app)")
    if args.app_url and not args.admin_key:
        parser.error("--app-url needs --admin-key (or CS_ADMIN_KEY)")
    try:
        sources = _sources(args, parser)
    except SourcesFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    options = RunOptions(
        tenants=args.tenant,
        sources=args.source if args.sources else None,
        full=args.full,
        allow_mass_delete=args.allow_mass_delete,
        progress=not args.no_progress,
    )
    if args.app_url:
        outcomes = run_sources(sources, AppTarget(args.app_url, args.admin_key), options)
    else:
        try:
            config = load_app_config(args.config)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return ExitCode.USAGE
        try:
            outcomes = _run_direct(config, sources, options)
        except TargetError as err:
            print(f"error: {err}", file=sys.stderr)
            return ExitCode.TARGET_FAILED
    _report(outcomes, args.rejects)
    export_metrics(outcomes, textfile=args.metrics_file, pushgateway=args.pushgateway)
    return exit_code(outcomes)


def _run_direct(config: AppConfig, sources: SourcesFile, options: RunOptions) -> list[SourceOutcome]:
    config = config.resolve_paths(ServiceSettings().config_base_dir or Path.cwd())
    # Heavy imports only once the arguments are known to be good.
    from services.embedder import load_embedding_backend
    from services.knowledge.store import MilvusKnowledgeStore

    embedder = load_embedding_backend(config.embedder)
    token = ServiceSettings().milvus_token
    try:
        store = MilvusKnowledgeStore(
            config.retriever,
            dimension=embedder.dimension,
            has_sparse=embedder.has_sparse,
            token=token.get_secret_value() if token else None,
        )
    except ServiceError as err:
        raise TargetError(err.message) from err
    target: SyncTarget = StoreTarget(store, embedder)
    try:
        return run_sources(sources, target, options)
    finally:
        store.close()


def _report(outcomes: list[SourceOutcome], rejects_path: Path) -> None:
    """Print one summary line per source and write the rejects report."""
    for o in outcomes:
        if o.report is None:
            # The error says whether anything changed (a timed-out run may still commit).
            print(f"{o.tenant}/{o.source}: FAILED: {o.error}", file=sys.stderr)
            continue
        r = o.report
        print(
            f"{o.tenant}/{o.source} ({o.mode}): {r.added} added, {r.updated} updated, {r.deleted} deleted, "
            f"{r.unchanged} unchanged, {r.rejected} rejected; {r.chunks_embedded} chunks embedded; "
            f"generation {r.generation}; {r.seconds:.1f} s"
        )
    rejects = [reject for o in outcomes for reject in o.rejects]
    if rejects:
        with rejects_path.open("w", encoding="utf-8") as report:
            for reject in rejects:
                report.write(reject.model_dump_json() + "\n")
        print(f"{len(rejects)} records rejected; reasons in {rejects_path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
