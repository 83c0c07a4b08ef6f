r"""Command line: load a local JSON/CSV/Markdown knowledge file (or folder) into Milvus.

Example::

    cs-knowledge-sync --config serve_config.dev.yaml --tenant lumen \\
        --source sample-kb --path knowledge_sync/samples/lumen_home.json

It reads the embedder and Milvus settings from the same Serve config the app runs
with. A Milvus Lite file admits one process: while the app runs, send the documents to
it instead (``--app-url http://127.0.0.1:8000 --admin-key ...``); the Retriever
deployment then runs the same pipeline and the assistant answers from them at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from knowledge_sync.documents import DocumentLoadError, KnowledgeDocument, load_documents
from services.config import TENANT_PATTERN, ServiceSettings, load_app_config
from services.errors import ServiceError


def main(argv: list[str] | None = None) -> int:
    """Run one sync; exit 0 on success, 1 on a bad input file, 2 on usage, 3 when Milvus fails."""
    parser = argparse.ArgumentParser(prog="cs-knowledge-sync", description="Load a knowledge file into Milvus.")
    parser.add_argument("--config", type=Path, help="Serve config YAML of the app (direct mode).")
    parser.add_argument("--app-url", help="Sync through a running app at this URL instead of opening Milvus.")
    parser.add_argument("--admin-key", default=os.environ.get("CS_ADMIN_KEY"), help="Admin key (or CS_ADMIN_KEY).")
    parser.add_argument("--tenant", required=True, help="Tenant id the documents belong to.")
    parser.add_argument("--source", default="files", help="Name of this source; its stale chunks are deleted.")
    parser.add_argument("--path", type=Path, required=True, help="A .json/.csv/.md file or a folder of them.")
    parser.add_argument("--max-chunk-chars", type=int, default=800, help="Largest chunk in characters.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not re.fullmatch(TENANT_PATTERN, args.tenant):
        parser.error(f"--tenant {args.tenant!r}: use lowercase letters, digits, '-' and '_' (max 64)")

    if bool(args.config) == bool(args.app_url):
        parser.error("give exactly one of --config (direct) and --app-url (through the running app)")
    if args.app_url and not args.admin_key:
        parser.error("--app-url needs --admin-key (or CS_ADMIN_KEY)")
    try:
        documents = load_documents(args.path)
    except DocumentLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.app_url:
        return _sync_through_app(args, documents)
    config = load_app_config(args.config).resolve_paths(ServiceSettings().config_base_dir or Path.cwd())

    # Heavy imports only once the input is known to be good.
    from knowledge_sync.pipeline import sync_documents
    from services.embedder import FlagEmbeddingBackend
    from services.retriever import MilvusKnowledgeStore

    embedder = FlagEmbeddingBackend(config.embedder)
    token = ServiceSettings().milvus_token
    try:
        store = MilvusKnowledgeStore(
            config.retriever,
            dimension=embedder.dimension,
            has_sparse=embedder.has_sparse,
            token=token.get_secret_value() if token else None,
        )
        try:
            report = sync_documents(
                store, embedder, args.tenant, args.source, documents, max_chunk_chars=args.max_chunk_chars
            )
        finally:
            store.close()
    except ServiceError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return 3
    _print_report(args, vars(report))
    return 0


def _print_report(args: argparse.Namespace, report: dict[str, int]) -> None:
    print(
        f"tenant {args.tenant}, source {args.source}: {report['documents']} documents, {report['chunks']} chunks "
        f"({report['embedded']} embedded, {report['unchanged']} unchanged, {report['deleted']} deleted)"
    )


def _sync_through_app(args: argparse.Namespace, documents: list[KnowledgeDocument]) -> int:
    import httpx

    url = f"{args.app_url.rstrip('/')}/admin/knowledge/{args.tenant}/sources/{args.source}"
    body = {"documents": [d.model_dump() for d in documents], "max_chunk_chars": args.max_chunk_chars}
    try:
        reply = httpx.put(url, json=body, headers={"X-API-Key": args.admin_key}, timeout=600)
    except httpx.HTTPError as err:
        print(f"error: the app at {args.app_url} is unreachable: {err}", file=sys.stderr)
        return 3
    if reply.status_code != 200:
        try:
            message = reply.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = reply.text[:500]
        print(f"error: the app answered {reply.status_code}: {message}", file=sys.stderr)
        return 3 if reply.status_code >= 500 else 1
    _print_report(args, reply.json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
