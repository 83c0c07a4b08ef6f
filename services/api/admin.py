"""``/admin``: adapter lifecycle (admin key) and knowledge ingest (admin key, or the tenant's ingest key)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from pydantic import Field

from services.adapters.admin import AdapterAdmin
from services.adapters.registry import NAME_PATTERN, AdapterVersion, Evaluation, TenantAdapters
from services.api.auth import AdminDisabledError, AdminGrant, require_tenant_scope
from services.api.models import StrictBody
from services.config import SOURCE_PATTERN, ChunkingConfig
from services.control_plane.store import KeyScope
from services.errors import InvalidRequestError, NotFoundError
from services.knowledge.ingest import SourceBatch

if TYPE_CHECKING:
    from services.chat.pipeline import ChatPipeline


def _admin(request: Request, _: AdminGrant) -> AdapterAdmin:
    admin: AdapterAdmin | None = request.app.state.adapter_admin
    if admin is None:
        raise AdminDisabledError("adapter administration is disabled: llm.adapters_dir is not set")
    return admin


def _known_tenant(request: Request, tenant: str) -> str:
    # Routes list the admin dependency first, so unauthenticated callers learn nothing here.
    if tenant not in request.app.state.directory.tenant_ids:
        raise NotFoundError(f"tenant {tenant!r} does not exist")
    return tenant


Admin = Annotated[AdapterAdmin, Depends(_admin)]
Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="Adapter name.")]
Version = Annotated[str, PathParam(pattern=NAME_PATTERN, description="Adapter version.")]
Tenant = Annotated[str, Depends(_known_tenant)]

router = APIRouter(prefix="/admin", tags=["admin"])


class RegisterVersion(StrictBody):
    """A version folder already placed at ``<store>/<name>/<version>``."""

    version: str = Field(pattern=NAME_PATTERN)


class Activate(StrictBody):
    """The version a tenant should use."""

    adapter: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)


class StartCanary(StrictBody):
    """A candidate version and the share of sessions it gets."""

    version: str = Field(pattern=NAME_PATTERN)
    percent: float = Field(gt=0, lt=100, strict=True, description="Share of the tenant's sessions, sticky per session.")


@router.get("/adapters")
async def list_adapters(admin: Admin) -> dict[str, Any]:
    """Every registered version and every tenant's active version, canary and history."""
    return admin.registry.state().model_dump(mode="json")


@router.post("/adapters/{name}/versions", status_code=201)
async def register_version(name: Name, body: RegisterVersion, admin: Admin) -> AdapterVersion:
    """Validate a version (files, then a real load into the engine) and register it."""
    return await admin.register(name, body.version)


@router.put("/adapters/{name}/versions/{version}/archive", status_code=201)
async def upload_version(name: Name, version: Version, request: Request, admin: Admin) -> AdapterVersion:
    """Upload a version as a .zip or .tar.gz of the PEFT folder (raw request body); validate and register it."""
    return await admin.register_archive(name, version, request.stream())


@router.put("/adapters/{name}/versions/{version}/evaluation")
async def record_evaluation(name: Name, version: Version, body: Evaluation, admin: Admin) -> AdapterVersion:
    """Keep a cs-eval result with a version (``cs-eval --canary`` sends it); the console shows it."""
    return admin.registry.record_evaluation(name, version, body.model_copy(update={"evaluated_at": None}))


@router.delete("/adapters/{name}/versions/{version}", status_code=204)
async def delete_version(name: Name, version: Version, admin: Admin) -> Response:
    """Forget a version; 409 while a tenant uses it."""
    await admin.delete(name, version)
    return Response(status_code=204)


@router.put("/tenants/{tenant}/adapter")
async def activate(admin: Admin, tenant: Tenant, body: Activate) -> TenantAdapters:
    """Switch the tenant to a version; requests already running finish on the old one."""
    return await admin.activate(tenant, body.adapter, body.version)


@router.post("/tenants/{tenant}/adapter/rollback")
async def rollback(admin: Admin, tenant: Tenant) -> TenantAdapters | None:
    """Undo the last activation; ``null`` means the tenant is back on the base model."""
    return await admin.rollback(tenant)


@router.put("/tenants/{tenant}/adapter/canary")
async def start_canary(admin: Admin, tenant: Tenant, body: StartCanary) -> TenantAdapters:
    """Send ``percent`` of the tenant's sessions to ``version``."""
    return await admin.start_canary(tenant, body.version, body.percent)


@router.post("/tenants/{tenant}/adapter/canary/promote")
async def promote_canary(admin: Admin, tenant: Tenant) -> TenantAdapters:
    """Make the canary version the active one."""
    return await admin.promote_canary(tenant)


@router.delete("/tenants/{tenant}/adapter/canary")
async def abort_canary(admin: Admin, tenant: Tenant) -> TenantAdapters:
    """End the canary."""
    return await admin.abort_canary(tenant)


class KnowledgeAdmin(Protocol):
    """Knowledge ingest and state of the running app (the Retriever deployment)."""

    async def ingest(
        self,
        tenant: str,
        source: str,
        batch: SourceBatch,
        chunking: ChunkingConfig | None,
        max_delete_fraction: float | None = None,
    ) -> dict[str, Any]:
        """Apply one source's batch atomically; returns the sync report."""
        ...

    async def state(self, tenant: str) -> dict[str, Any]:
        """Committed generation and source cursors."""
        ...


def _knowledge_key(request: Request, tenant: str) -> None:
    """The platform admin key, or the tenant's own ingest key (it may sync this tenant's knowledge only)."""
    scopes = (KeyScope.INGEST, KeyScope.OPERATOR) if request.method == "GET" else (KeyScope.INGEST,)
    require_tenant_scope(request, tenant, scopes)


def _knowledge(request: Request, _: Annotated[None, Depends(_knowledge_key)]) -> KnowledgeAdmin:
    knowledge: KnowledgeAdmin | None = request.app.state.knowledge
    if knowledge is None:
        raise AdminDisabledError("knowledge ingest is not available in this app")
    return knowledge


Knowledge = Annotated[KnowledgeAdmin, Depends(_knowledge)]
Source = Annotated[str, PathParam(pattern=SOURCE_PATTERN, description="Knowledge source name.")]


class KnowledgeUpload(SourceBatch):
    """One pull of a source, as ``cs-knowledge-sync --app-url`` sends it."""

    chunking: ChunkingConfig | None = Field(None, description="Chunk size and overlap; defaults when absent.")
    max_delete_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        strict=True,
        description="A complete pull deleting more of the source's documents than this is refused (409, "
        "mass_delete_refused) and changes nothing.",
    )
    allow_mass_delete: bool = Field(
        False, strict=True, description="Accept a complete pull that deletes most of the source."
    )


@router.get("/knowledge/{tenant}")
async def knowledge_state(knowledge: Knowledge, tenant: Tenant) -> dict[str, Any]:
    """The tenant's committed knowledge generation and each source's cursor and last success."""
    return await knowledge.state(tenant)


@router.put("/knowledge/{tenant}/sources/{source}")
async def sync_source(knowledge: Knowledge, tenant: Tenant, source: Source, body: KnowledgeUpload) -> dict[str, Any]:
    """Apply one pull of a source to the tenant's knowledge base in the running app.

    ``complete: true`` makes the source equal to ``documents`` (others are deleted);
    ``complete: false`` changes only the given documents and ``deleted_doc_ids``. The
    run is atomic: the assistant sees all of it once it returns, or none of it if it fails.
    """  # fmt: skip
    batch = SourceBatch.model_validate(
        body.model_dump(exclude={"chunking", "max_delete_fraction", "allow_mass_delete"})
    )
    guard = None if body.allow_mass_delete else body.max_delete_fraction
    return await knowledge.ingest(tenant, source, batch, body.chunking, guard)


class SearchTest(StrictBody):
    """A question to try against a tenant's knowledge, as a shopper would ask it."""

    question: str = Field(min_length=1, max_length=2000, json_schema_extra={"pattern": r"\S"})


def _passage(text: str, limit: int = 280) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _operator_key(request: Request, tenant: str) -> None:
    require_tenant_scope(request, tenant, (KeyScope.OPERATOR,))


@router.post("/tenants/{tenant}/search-test")
async def search_test(
    request: Request, _: Annotated[None, Depends(_operator_key)], tenant: Tenant, body: SearchTest
) -> dict[str, Any]:
    """The fused hits of a question with each signal's score, and the relevance gate's decision and margin.

    Runs the chat's own embedding, hybrid search, reranking and gate; nothing is generated,
    remembered or recorded. Admin key, or the tenant's operator key.
    """
    profile = request.app.state.directory.tenant(tenant)
    if not body.question.strip():
        raise InvalidRequestError("question must not be blank")
    pipeline: ChatPipeline = request.app.state.pipeline
    hits, grounding = await pipeline.search_test(profile, body.question.strip())
    kept = {h.chunk.id for h in grounding.chunks}
    return {
        "question": body.question.strip(),
        "decision": "fallback" if grounding.is_empty else "answer",
        "confidence": grounding.confidence,
        # The gate's relevance_margin is compared with this lead; operators tune it here.
        "margin": grounding.margin,
        "hits": [
            {
                "doc_id": h.chunk.doc_id,
                "title": h.chunk.title,
                "source": h.chunk.source,
                "passage": _passage(h.chunk.text),
                "fused": h.score,
                "dense": h.dense_score,
                "sparse": h.sparse_score,
                "bm25": h.bm25_score,
                "rerank": h.rerank_score,
                "kept": h.chunk.id in kept,
            }
            for h in hits
        ],
    }
