"""API keys as FastAPI dependencies: each key belongs to exactly one tenant; only digests are kept.

Keys are issued with ``cs-api-key`` (:mod:`cs_tools.api_key`); digests are computed in
:mod:`services.security`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from services.config import TenantConfig
from services.errors import AuthenticationError, ForbiddenError
from services.security import key_digest, matches_any, presented_key_digest


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


@dataclass(frozen=True)
class ApiKeyAuth:
    """Maps key digests to tenant profiles."""

    digests: dict[str, TenantConfig]

    @classmethod
    def from_config(cls, tenants: list[TenantConfig], env_keys: dict[str, str]) -> ApiKeyAuth:
        """Combine the tenants' keys from the config with ``CS_API_KEYS`` (digest or key -> tenant id).

        Raises:
            ValueError: an environment key names a tenant the config does not define, or a
                key is given to two tenants.

        """
        by_id = {t.tenant: t for t in tenants}
        pairs = [(key_digest(key.get_secret_value()), t) for t in tenants for key in t.api_keys]
        for key, tenant_id in env_keys.items():
            if tenant_id not in by_id:
                raise ValueError(f"CS_API_KEYS names tenant {tenant_id!r}, which is not configured")
            pairs.append((key_digest(key), by_id[tenant_id]))
        digests: dict[str, TenantConfig] = {}
        for digest, tenant in pairs:
            if digests.setdefault(digest, tenant).tenant != tenant.tenant:
                raise ValueError("an API key is given to more than one tenant")
        return cls(digests=digests)

    def tenant_for(self, presented: str) -> TenantConfig | None:
        """The tenant of a presented key (looked up by digest), or None."""
        return self.digests.get(presented_key_digest(presented))

    def __call__(self, request: Request) -> TenantConfig:
        """FastAPI dependency: the caller's tenant from ``Authorization: Bearer`` or ``X-API-Key``."""
        tenant = self.tenant_for(presented_key(request))
        if tenant is None:
            raise AuthenticationError("unknown API key")
        return tenant


def admin_digests(configured: list[str]) -> list[str]:
    """Stored digests of the admin keys (config and ``CS_ADMIN_KEYS``)."""
    return [key_digest(k) for k in configured]


def is_admin(presented: str, digests: list[str]) -> bool:
    """Whether a presented key is an admin key (compared by digest, in constant time per key)."""
    return matches_any(presented, digests)


def caller_tenant(request: Request) -> TenantConfig:
    """FastAPI dependency: the tenant of the request's API key (the app's :class:`ApiKeyAuth`)."""
    tenant: TenantConfig = request.app.state.auth(request)
    return tenant


Caller = Annotated[TenantConfig, Depends(caller_tenant)]


def require_same_tenant(caller: TenantConfig, tenant: str) -> None:
    """Refuse a caller acting on another tenant's resource.

    Raises:
        ForbiddenError: the key belongs to another tenant (403: the key is valid, the target is not its own).

    """
    if caller.tenant != tenant:
        raise ForbiddenError(f"this API key belongs to another tenant and cannot use {tenant!r}")
