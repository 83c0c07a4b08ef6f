"""``/admin``: adapter lifecycle and knowledge ingest, behind an admin key (``CS_ADMIN_KEYS`` or config)."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from knowledge_sync.documents import KnowledgeDocument
from services.adapters.admin import AdapterAdmin
from services.adapters.registry import NAME_PATTERN, AdapterVersion, TenantAdapters
from services.api.auth import presented_key
from services.errors import AuthenticationError, NotFoundError, ServiceError


class AdminDisabledError(ServiceError):
    """No admin key is configured, so the admin API is off."""

    status_code = 403
    code = "admin_disabled"


def _admin_key(request: Request) -> None:
    keys: list[str] = request.app.state.admin_keys
    if not keys:
        raise AdminDisabledError("the admin API is disabled: no admin key is configured")
    presented = presented_key(request)
    if not any(hmac.compare_digest(k.encode(), presented.encode()) for k in keys):
        raise AuthenticationError("unknown admin key")


def _admin(request: Request, _: Annotated[None, Depends(_admin_key)]) -> AdapterAdmin:
    admin: AdapterAdmin | None = request.app.state.adapter_admin
    if admin is None:
        raise AdminDisabledError("adapter administration is disabled: llm.adapters_dir is not set")
    return admin


def _known_tenant(request: Request, tenant: str) -> str:
    # Routes list the admin dependency first, so unauthenticated callers learn nothing here.
    if tenant not in request.app.state.tenant_ids:
        raise NotFoundError(f"tenant {tenant!r} is not configured")
    return tenant


Admin = Annotated[AdapterAdmin, Depends(_admin)]
AdminKey = Annotated[None, Depends(_admin_key)]
Name = Annotated[str, PathParam(pattern=NAME_PATTERN, description="Adapter name.")]
Version = Annotated[str, PathParam(pattern=NAME_PATTERN, description="Adapter version.")]
Tenant = Annotated[str, Depends(_known_tenant)]

router = APIRouter(prefix="/admin", tags=["admin"])


class Strict(BaseModel):
    """Admin request bodies reject unknown fields."""

    model_config = ConfigDict(extra="forbid")


class RegisterVersion(Strict):
    """A version folder already placed at ``<store>/<name>/<version>``."""

    version: str = Field(pattern=NAME_PATTERN)


class Activate(Strict):
    """The version a tenant should use."""

    adapter: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)


class StartCanary(Strict):
    """A candidate version and the share of sessions it gets."""

    version: str = Field(pattern=NAME_PATTERN)
    percent: float = Field(gt=0, lt=100, description="Share of the tenant's sessions, sticky per session.")


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
    return await admin.register_archive(name, version, await request.body())


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


class KnowledgeUpload(Strict):
    """The complete current document set of one source; documents missing from it are deleted."""

    documents: list[KnowledgeDocument] = Field(max_length=100_000)
    max_chunk_chars: int = Field(800, ge=100, le=8000, description="Largest chunk in characters.")


@router.put("/knowledge/{tenant}/sources/{source}")
async def sync_source(
    _: AdminKey,
    tenant: Tenant,
    source: Annotated[str, PathParam(pattern=NAME_PATTERN)],
    body: KnowledgeUpload,
    request: Request,
) -> dict[str, int]:
    """Make a tenant's knowledge from ``source`` equal to ``documents``, in the running app.

    Runs in the Retriever deployment, which owns the Milvus connection (a Milvus Lite file
    admits one process), so the assistant answers from the new policies at once.
    """  # fmt: skip
    ingest = request.app.state.knowledge_ingest
    if ingest is None:
        raise AdminDisabledError("knowledge ingest is not available in this app")
    report: dict[str, int] = await ingest(tenant, source, body.documents, body.max_chunk_chars)
    return report
