"""Loading knowledge into a Milvus Lite file before an app opens it (one process per Lite file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_KB = REPO_ROOT / "knowledge_sync" / "samples" / "lumen_home.json"


def sync_complete(store: Any, embedder: Any, tenant: str, source: str, documents: list[Any]) -> Any:
    """Make one source of a tenant equal to ``documents`` (a complete pull); returns the SyncReport."""
    from services.config import ChunkingConfig
    from services.knowledge.ingest import SourceBatch, sync_source

    return sync_source(
        store, embedder, tenant, source, SourceBatch(complete=True, documents=documents), ChunkingConfig()
    )


def load_sample_kb(
    milvus_path: Path, embedder_args: dict[str, Any], retriever_args: dict[str, Any], tenant: str = "lumen"
) -> None:
    """Sync the sample knowledge base into a Milvus Lite file with the given embedder, then release the file."""
    from services.config import EmbedderConfig, RetrieverConfig
    from services.embedder import load_embedding_backend
    from services.knowledge.documents import load_documents
    from services.knowledge.store import MilvusKnowledgeStore

    embedder = load_embedding_backend(EmbedderConfig.model_validate(embedder_args))
    retriever = RetrieverConfig.model_validate(retriever_args | {"milvus_uri": str(milvus_path)})
    store = MilvusKnowledgeStore(retriever, dimension=embedder.dimension, has_sparse=embedder.has_sparse)
    try:
        sync_complete(store, embedder, tenant, "sample-kb", load_documents(SAMPLE_KB))
    finally:
        store.close()
