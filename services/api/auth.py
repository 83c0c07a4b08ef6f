"""API keys as FastAPI dependencies: every key has a scope, and every tenant key one tenant.

Scopes (:class:`~services.control_plane.store.KeyScope`): a tenant's *storefront* key
(``/v1``: chat, sessions, feedback), its *operator* key (its insights, records, reviews,
exports and knowledge state, and chat as its assistant), its *ingest* key (its knowledge
sync), and the platform's *admin* key (everything). Keys are looked up by digest in the
replica's :class:`~services.control_plane.directory.TenantDirectory`; only digests are
ever kept (:mod:`services.security`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.config import TenantConfig
from services.control_plane.directory import TenantDirectory
from services.control_plane.models import utcnow
from services.control_plane.store import KeyGrant, KeyScope
from services.errors import AuthenticationError, ForbiddenError, ServiceError


class AdminDisabledError(ServiceError):
    """No admin key exists, so the admin API is off."""

    status_code = 403
    code = "admin_disabled"


def presented_key(request: Request) -> str:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key``.

    Raises:
        AuthenticationError: neither header is present.

    """
    header = request.headers.get("authorization", "")
    presented = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not presented:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    return presented


def directory_of(request: Request) -> TenantDirectory:
    """The replica's tenant directory."""
    directory: TenantDirectory = request.app.state.directory
    return directory


def caller_grant(request: Request) -> KeyGrant:
    """FastAPI dependency: what the request's key grants.

    Raises:
        AuthenticationError: no key, or an unknown, revoked or expired one.

    """
    grant = directory_of(request).grant(presented_key(request), utcnow())
    if grant is None:
        raise AuthenticationError("unknown API key")
    return grant


def caller_tenant(request: Request) -> TenantConfig:
    """FastAPI dependency: the tenant of a storefront or operator key (the ``/v1`` API).

    Raises:
        AuthenticationError: no valid key.
        ForbiddenError: an admin or ingest key, which cannot chat.

    """
    grant = caller_grant(request)
    if grant.scope not in (KeyScope.STOREFRONT, KeyScope.OPERATOR) or grant.tenant is None:
        raise ForbiddenError(f"a {grant.scope} key cannot use the chat API: use a tenant's storefront key")
    tenant = directory_of(request).tenant(grant.tenant)
    if tenant is None:
        raise AuthenticationError("unknown API key")
    return tenant


Caller = Annotated[TenantConfig, Depends(caller_tenant)]
Grant = Annotated[KeyGrant, Depends(caller_grant)]


def admin_grant(request: Request) -> KeyGrant:
    """FastAPI dependency: the platform admin key.

    Raises:
        AdminDisabledError: no admin key exists at all.
        AuthenticationError: an unknown key.
        ForbiddenError: a valid key of another scope.

    """
    presented = presented_key(request)
    grant = directory_of(request).grant(presented, utcnow())
    if grant is not None and grant.scope is KeyScope.ADMIN:
        return grant
    if not directory_of(request).has_scope(KeyScope.ADMIN):
        raise AdminDisabledError("the admin API is disabled: no admin key is configured")
    if grant is not None:
        raise ForbiddenError(f"a {grant.scope} key may not do this: it needs the platform admin key")
    raise AuthenticationError("unknown admin key")


AdminGrant = Annotated[KeyGrant, Depends(admin_grant)]


def require_tenant_scope(request: Request, tenant: str, scopes: tuple[KeyScope, ...]) -> KeyGrant:
    """The admin key, or a key of ``tenant`` with one of ``scopes``.

    Raises:
        AdminDisabledError: no key at all could pass here.
        AuthenticationError: an unknown key.
        ForbiddenError: a key of another tenant, or of a scope that may not do this.

    """
    grant = directory_of(request).grant(presented_key(request), utcnow())
    if grant is not None and grant.scope is KeyScope.ADMIN:
        return grant
    if grant is None:
        if not any(directory_of(request).has_scope(s) for s in (KeyScope.ADMIN, *scopes)):
            raise AdminDisabledError("the admin API is disabled: no admin key is configured")
        raise AuthenticationError("unknown admin key")
    if grant.tenant != tenant:
        raise ForbiddenError(f"this {grant.scope} key belongs to another tenant and cannot act on {tenant!r}")
    if grant.scope not in scopes:
        raise ForbiddenError(f"a {grant.scope} key may not do this; it needs an admin or {'/'.join(scopes)} key")
    return grant


def require_same_tenant(caller: TenantConfig, tenant: str) -> None:
    """Refuse a caller acting on another tenant's resource.

    Raises:
        ForbiddenError: the key belongs to another tenant (403: the key is valid, the target is not its own).

    """
    if caller.tenant != tenant:
        raise ForbiddenError(f"this API key belongs to another tenant and cannot use {tenant!r}")
