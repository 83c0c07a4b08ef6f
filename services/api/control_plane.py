"""``/admin``: tenants and keys (platform admin), and each tenant's records, insights, reviews and exports.

Tenants and keys change at runtime: the replica that takes a change serves it before it
answers, every other replica within ``control_plane.refresh_interval_s``. A tenant's
operator key reaches that tenant's records, insights, reviews and exports; the admin key
reaches everything.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import Field, ValidationError

from services.api.auth import AdminDisabledError, AdminGrant, Grant, require_tenant_scope
from services.api.models import StrictBody
from services.config import TENANT_PATTERN, StandardReplies, TenantConfig
from services.config.orchestrator import TenantWidget
from services.config.tools import TenantTools
from services.control_plane.plane import ControlPlane
from services.control_plane.store import KeyGrant, KeyScope
from services.errors import ConflictError, InvalidRequestError, NotFoundError

router = APIRouter(prefix="/admin", tags=["control plane"])


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane | None = request.app.state.control_plane
    if plane is None:
        raise AdminDisabledError("the control plane is off: control_plane is null in the config")
    return plane


Plane = Annotated[ControlPlane, Depends(_plane)]
TenantId = Annotated[str, PathParam(pattern=TENANT_PATTERN, description="Tenant id.")]
KeyId = Annotated[str, PathParam(pattern=r"^key_[0-9a-f]{16}$", description="Key id (key_...).")]


def _operator(request: Request, tenant: TenantId) -> KeyGrant:
    # Authorization first: a caller without a key learns nothing about which tenants exist.
    grant = require_tenant_scope(request, tenant, (KeyScope.OPERATOR,))
    if tenant not in request.app.state.directory.tenant_ids:
        raise NotFoundError(f"tenant {tenant!r} does not exist")
    return grant


Operator = Annotated[KeyGrant, Depends(_operator)]


class TenantProfile(StrictBody):
    """What a tenant's assistant is: every field but the id may be changed later."""

    persona: str = Field(min_length=1, description="System prompt: who the assistant is and how it speaks.")
    fallback_message: str | None = Field(None, description="Reply when the knowledge has nothing.")
    relevance_threshold: float | None = Field(
        None, ge=0, le=1, strict=True, description="Overrides the gate's threshold."
    )
    adapter: str | None = Field(None, description="Configured LoRA adapter (the adapter registry's active one wins).")
    tools: TenantTools = Field(default_factory=TenantTools, description="Storefront URL and credentials reference.")
    retention_days: int | None = Field(
        None, ge=1, le=36_500, strict=True, description="Days its conversation records are kept."
    )
    order_id_patterns: list[str] = Field(default_factory=list, description="Order-id regexes to redact.")
    standard_replies: StandardReplies | None = Field(None, description="Handover, sensitive, out-of-scope replies.")
    widget: TenantWidget = Field(default_factory=TenantWidget, description="Storefront widget: secret, origins.")


class NewTenant(TenantProfile):
    """A tenant to create."""

    tenant: str = Field(pattern=TENANT_PATTERN, description="Tenant id: lowercase letters, digits, - and _.")


class TenantChanges(StrictBody):
    """Profile fields to change; absent fields stay as they are, null clears an optional one."""

    persona: str | None = Field(None, min_length=1)
    fallback_message: str | None = None
    relevance_threshold: float | None = Field(None, ge=0, le=1, strict=True)
    adapter: str | None = None
    tools: TenantTools | None = None
    retention_days: int | None = Field(None, ge=1, le=36_500, strict=True)
    order_id_patterns: list[str] | None = None
    standard_replies: StandardReplies | None = None
    widget: TenantWidget | None = None


class NewKey(StrictBody):
    """A key to issue."""

    scope: KeyScope = Field(description="storefront, operator or ingest (with tenant), or admin (without).")
    tenant: str | None = Field(None, pattern=TENANT_PATTERN, description="The key's tenant; none for admin.")
    label: str | None = Field(None, max_length=200, description="What the key is for (shown in listings).")


class Rotation(StrictBody):
    """How long the old key stays valid beside the new one."""

    grace_s: float | None = Field(
        None, ge=0, le=30 * 86400, strict=True, description="Seconds; control_plane's default if absent."
    )


class ReviewBody(StrictBody):
    """An operator's verdict on a recorded answer."""

    verdict: Literal["approved", "corrected"]
    answer: str | None = Field(None, description="The corrected answer (required for corrected).")


def _profile(tenant: TenantConfig) -> dict[str, Any]:
    return tenant.model_dump(mode="json", exclude={"api_keys", "ingest_api_keys", "operator_api_keys"})


def _invalid(err: ValueError) -> InvalidRequestError:
    """A 400 naming the field a profile check refused."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return InvalidRequestError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    return InvalidRequestError(str(err).splitlines()[0])


def _tenant_config(body: NewTenant) -> TenantConfig:
    try:
        return TenantConfig.model_validate(body.model_dump())
    except ValidationError as err:
        raise _invalid(err) from err


@router.get("/whoami")
async def whoami(grant: Grant) -> dict[str, Any]:
    """What the presented key is: its id, scope and tenant (the console shows only what it may do)."""
    return {"key_id": grant.key_id, "scope": grant.scope, "tenant": grant.tenant}


@router.get("/tenants")
async def list_tenants(_: AdminGrant, plane: Plane) -> list[dict[str, Any]]:
    """Every tenant's profile."""
    return [_profile(t) for t in await plane.run(plane.store.tenants)]


@router.post("/tenants", status_code=201)
async def create_tenant(_: AdminGrant, plane: Plane, body: NewTenant) -> dict[str, Any]:
    """Add a tenant; every replica serves it within the refresh interval, no restart."""
    return _profile(await plane.changed(plane.store.create_tenant, _tenant_config(body)))


@router.get("/tenants/{tenant}")
async def get_tenant(_: Operator, plane: Plane, tenant: TenantId) -> dict[str, Any]:
    """One tenant's profile."""
    return _profile(await plane.run(plane.store.tenant, tenant))


@router.patch("/tenants/{tenant}")
async def update_tenant(_: AdminGrant, plane: Plane, tenant: TenantId, body: TenantChanges) -> dict[str, Any]:
    """Change a tenant's profile; from now on the config file's seed no longer overrides it."""
    changes = body.model_dump(include=body.model_fields_set)
    if not changes:
        raise InvalidRequestError("no field to change")
    if changes.get("persona", "") is None:
        raise InvalidRequestError("persona: cannot be null")
    try:
        return _profile(await plane.changed(plane.store.update_tenant, tenant, changes))
    except ValueError as err:
        raise _invalid(err) from err


@router.get("/keys")
async def list_keys(
    _: AdminGrant, plane: Plane, tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None
) -> list[dict[str, Any]]:
    """Every key's lifecycle (never the key): scope, tenant, created, last used, rotated, expires, revoked."""
    return await plane.run(plane.store.keys, tenant)


@router.post("/keys", status_code=201)
async def issue_key(_: AdminGrant, plane: Plane, body: NewKey) -> dict[str, Any]:
    """Issue a key; the response is the only place its plain text appears."""
    try:
        issued = await plane.changed(plane.store.issue_key, body.scope, body.tenant, body.label)
    except ValueError as err:
        raise InvalidRequestError(str(err)) from err
    return {"key": issued.key} | issued.info


def _not_own_key(grant: KeyGrant, key_id: str) -> None:
    # A caller that revokes or rotates the key it calls with would lock itself out.
    if grant.key_id == key_id:
        raise ConflictError(
            f"key {key_id!r} is the key of this request: rotate or revoke it with another admin key or cs-control-plane"
        )


@router.post("/keys/{key_id}/rotate", status_code=201)
async def rotate_key(grant: AdminGrant, plane: Plane, key_id: KeyId, body: Rotation | None = None) -> dict[str, Any]:
    """Issue the key's replacement; the old key keeps working for the grace period, then stops."""
    _not_own_key(grant, key_id)
    grace = body.grace_s if body and body.grace_s is not None else plane.config.key_rotation_grace_s
    issued = await plane.changed(plane.store.rotate_key, key_id, grace)
    return {"key": issued.key} | issued.info


@router.delete("/keys/{key_id}")
async def revoke_key(grant: AdminGrant, plane: Plane, key_id: KeyId) -> dict[str, Any]:
    """Revoke a key: refused by this replica at once, by every replica within the refresh interval."""
    _not_own_key(grant, key_id)
    return await plane.changed(plane.store.revoke_key, key_id)


# --- a tenant's records, insights, reviews, exports ---------------------------------------------


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _moment(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError as err:
        raise InvalidRequestError(f"{name}: {value!r} is not a date or time: {err}") from err


def _period(start: str | None, end: str | None, days: int) -> tuple[datetime, datetime]:
    last = _moment(end, "end") or datetime.now(UTC)
    first = _moment(start, "start") or last - timedelta(days=days)
    if first >= last:
        raise InvalidRequestError("start must be before end")
    return first, last


#: An ISO 8601 date or date and time, with an optional zone: the one form the period accepts.
ISO_MOMENT = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"
Start = Annotated[
    str | None,
    Query(
        pattern=ISO_MOMENT, description="Period start: ISO 8601 date or time (UTC without a zone). Default: end - days."
    ),
]
End = Annotated[
    str | None,
    Query(pattern=ISO_MOMENT, description="Period end: ISO 8601 date or time (UTC without a zone). Default: now."),
]
Days = Annotated[int, Query(ge=1, le=3660, description="Period length when start is absent.")]
Similarity = Annotated[
    float | None, Query(ge=0, le=1, description="Clustering similarity; control_plane.cluster_similarity if absent.")
]


@router.get("/tenants/{tenant}/insights")
async def tenant_insights(
    _: Operator,
    plane: Plane,
    tenant: TenantId,
    start: Start = None,
    end: End = None,
    days: Days = 7,
    similarity: Similarity = None,
) -> dict[str, Any]:
    """A tenant's period: its rates, rates per day, top unanswered clusters and worst-rated answers.

    Rates: answer, fallback, handover and resolution rates and satisfaction. Clusters: counts and examples.
    """
    first, last = _period(start, end, days)
    return await plane.insights(tenant, first, last, similarity)


@router.get(
    "/tenants/{tenant}/exports/knowledge-gaps",
    responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}},
)
async def knowledge_gaps(
    _: Operator,
    plane: Plane,
    tenant: TenantId,
    format: Annotated[Literal["csv", "jsonl"], Query(description="csv or jsonl.")] = "csv",
    start: Start = None,
    end: End = None,
    days: Days = 30,
    similarity: Similarity = None,
) -> Response:
    """The knowledge-gap report for the knowledge owner.

    Each cluster of unanswered questions: its count, examples, and when it was first and last asked.
    """
    first, last = _period(start, end, days)
    text = await plane.gap_report(tenant, first, last, format, similarity)
    media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
    name = f"{tenant}-knowledge-gaps.{format}"
    return Response(text, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/tenants/{tenant}/exports/training-data")
async def training_data(_: Operator, plane: Plane, tenant: TenantId) -> list[dict[str, str]]:
    """The reviewed question/answer pairs as alpaca JSON, for ``cs-train-adapter --data``."""
    return await plane.training_data(tenant)


@router.get("/tenants/{tenant}/records/{reply_id}")
async def get_record(
    _: Operator, plane: Plane, tenant: TenantId, reply_id: Annotated[str, PathParam(max_length=64)]
) -> dict[str, Any]:
    """One conversation record (redacted), with its feedback and review."""
    return await plane.run(plane.store.record, tenant, reply_id)


@router.put("/tenants/{tenant}/records/{reply_id}/review")
async def review_record(
    grant: Operator,
    plane: Plane,
    tenant: TenantId,
    reply_id: Annotated[str, PathParam(max_length=64)],
    body: ReviewBody,
) -> dict[str, Any]:
    """Approve a recorded answer or correct it: the pair goes into the training export."""
    try:
        await plane.run(plane.store.review, tenant, reply_id, body.verdict, body.answer, grant.key_id)
    except ValueError as err:
        raise InvalidRequestError(str(err)) from err
    return await plane.run(plane.store.record, tenant, reply_id)


@router.delete("/tenants/{tenant}/shoppers/{user_id}")
async def erase_shopper(
    _: Operator,
    plane: Plane,
    tenant: TenantId,
    user_id: Annotated[str, PathParam(min_length=1, max_length=128, description="The storefront's shopper id.")],
) -> dict[str, Any]:
    """Erase everything kept about one shopper: records, feedback, reviews, and their conversations."""
    return await plane.erase_shopper(tenant, user_id)


@router.post("/control-plane/purge")
async def purge(_: AdminGrant, plane: Plane) -> dict[str, Any]:
    """Delete records past each tenant's retention now (``cs-control-plane purge`` does the same)."""
    return {"purged": await plane.purge()}
