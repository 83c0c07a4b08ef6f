"""The Milvus collections of the knowledge base: the chunks (with their indexes) and the per-tenant state.

Fields, indexes and the BM25 function are declared here once; an existing collection made
for another embedder dimension or with other settings is refused with a clear error.
"""

from __future__ import annotations

import logging
from typing import Any

from services.config import RetrieverConfig
from services.errors import KnowledgeBaseUnavailableError

logger = logging.getLogger(__name__)

DENSE_FIELD = "dense_vector"
SPARSE_FIELD = "sparse_vector"
BM25_FIELD = "bm25_vector"
SCALAR_FIELDS = [
    "id",
    "tenant",
    "source",
    "doc_id",
    "chunk_no",
    "title",
    "text",
    "category",
    "updated_at",
    "content_hash",
]
MAX_TEXT_CHARS = 8192
#: Milvus VARCHAR limits count UTF-8 bytes (a CJK character is 3): what a document's fields may hold.
FIELD_BYTES = {"doc_id": 256, "title": 1024, "category": 128}


def ensure_chunk_collection(client: Any, config: RetrieverConfig, *, dimension: int, has_sparse: bool) -> None:
    """Create the chunk collection (fields, indexes, BM25 function), or check and load the existing one."""
    from pymilvus import DataType, Function, FunctionType

    name = config.collection
    if client.has_collection(name):
        _check_existing(client, config, dimension=dimension, has_sparse=has_sparse)
        client.load_collection(name)
        return
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("tenant", DataType.VARCHAR, max_length=64)
    schema.add_field("source", DataType.VARCHAR, max_length=256)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=FIELD_BYTES["doc_id"])
    schema.add_field("chunk_no", DataType.INT64)
    schema.add_field("title", DataType.VARCHAR, max_length=FIELD_BYTES["title"])
    schema.add_field(
        "text",
        DataType.VARCHAR,
        max_length=MAX_TEXT_CHARS * 4,  # bytes: a CJK character is 3 in UTF-8
        enable_analyzer=config.enable_bm25,
        analyzer_params=config.bm25_analyzer if config.enable_bm25 else None,
    )
    schema.add_field("category", DataType.VARCHAR, max_length=FIELD_BYTES["category"])
    schema.add_field("updated_at", DataType.INT64)
    schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("gen_from", DataType.INT64)
    schema.add_field("gen_to", DataType.INT64)
    schema.add_field(DENSE_FIELD, DataType.FLOAT_VECTOR, dim=dimension)
    index = client.prepare_index_params()
    index.add_index(DENSE_FIELD, index_type=config.dense_index_type, metric_type="COSINE")
    if has_sparse:
        schema.add_field(SPARSE_FIELD, DataType.SPARSE_FLOAT_VECTOR)
        index.add_index(SPARSE_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    if config.enable_bm25:
        schema.add_field(BM25_FIELD, DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(
            Function(
                name="text_bm25",
                function_type=FunctionType.BM25,
                input_field_names=["text"],
                output_field_names=[BM25_FIELD],
            )
        )
        index.add_index(BM25_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(name, schema=schema, index_params=index)
    logger.info("created collection %s (dim %d, sparse %s)", name, dimension, has_sparse)


def ensure_state_collection(client: Any, name: str) -> None:
    """Create (or load) the small collection of per-tenant committed generations and source cursors."""
    from pymilvus import DataType

    if client.has_collection(name):
        client.load_collection(name)
        return
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("tenant", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("state", DataType.JSON)
    # Milvus requires a vector field in every collection; this one is never searched.
    schema.add_field("unused_vector", DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index("unused_vector", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index)


def _check_existing(client: Any, config: RetrieverConfig, *, dimension: int, has_sparse: bool) -> None:
    """Refuse a collection made for another embedder or with other settings (a clear error, not bad search)."""
    fields = {f["name"]: f for f in client.describe_collection(config.collection)["fields"]}
    existing_dim = int(fields.get(DENSE_FIELD, {}).get("params", {}).get("dim", -1))
    if existing_dim != dimension:
        raise KnowledgeBaseUnavailableError(
            f"collection {config.collection} holds {existing_dim}-dim vectors but the embedder gives {dimension}; "
            "use another collection name or re-sync the knowledge base"
        )
    for field, wanted in (
        (SPARSE_FIELD, has_sparse),
        (BM25_FIELD, config.enable_bm25),
        ("gen_to", True),
    ):
        if wanted and field not in fields:
            raise KnowledgeBaseUnavailableError(
                f"collection {config.collection} lacks {field}; it was created by another version or with other "
                "settings: drop it (or use another collection name) and sync the knowledge base again"
            )
