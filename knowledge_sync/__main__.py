r"""Command line: load a local JSON/CSV/Markdown knowledge file (or folder) into Milvus.

Example::

    cs-knowledge-sync --config serve_config.dev.yaml --tenant lumen \\
        --source sample-kb --path knowledge_sync/samples/lumen_home.json

It reads the embedder and Milvus settings from the same Serve config the app runs
with. A Milvus Lite file admits one process: run it while the app is stopped.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from knowledge_sync.documents import DocumentLoadError, load_documents
from services.config import TENANT_PATTERN, ServiceSettings, load_app_config
from services.errors import ServiceError


def main(argv: list[str] | None = None) -> int:
    """Run one sync; exit 0 on success, 1 on a bad input file, 2 on usage, 3 when Milvus fails."""
    parser = argparse.ArgumentParser(prog="cs-knowledge-sync", description="Load a knowledge file into Milvus.")
    parser.add_argument("--config", type=Path, required=True, help="Serve config YAML of the app.")
    parser.add_argument("--tenant", required=True, help="Tenant id the documents belong to.")
    parser.add_argument("--source", default="files", help="Name of this source; its stale chunks are deleted.")
    parser.add_argument("--path", type=Path, required=True, help="A .json/.csv/.md file or a folder of them.")
    parser.add_argument("--max-chunk-chars", type=int, default=800, help="Largest chunk in characters.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not re.fullmatch(TENANT_PATTERN, args.tenant):
        parser.error(f"--tenant {args.tenant!r}: use lowercase letters, digits, '-' and '_' (max 64)")

    try:
        documents = load_documents(args.path)
    except DocumentLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
    print(
        f"tenant {args.tenant}, source {args.source}: {report.documents} documents, {report.chunks} chunks "
        f"({report.embedded} embedded, {report.unchanged} unchanged, {report.deleted} deleted)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
