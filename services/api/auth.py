"""API keys: each key belongs to exactly one tenant."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from services.config import TenantConfig
from services.errors import AuthenticationError


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
    """Maps API keys to tenant profiles."""

    keys: tuple[tuple[str, TenantConfig], ...]

    @classmethod
    def from_config(cls, tenants: list[TenantConfig], env_keys: dict[str, str]) -> ApiKeyAuth:
        """Combine keys from the config (dev) with keys from ``CS_API_KEYS`` (production).

        Raises:
            ValueError: an environment key names a tenant the config does not define.

        """
        by_id = {t.tenant: t for t in tenants}
        pairs = [(key.get_secret_value(), t) for t in tenants for key in t.api_keys]
        for key, tenant_id in env_keys.items():
            if tenant_id not in by_id:
                raise ValueError(f"CS_API_KEYS names tenant {tenant_id!r}, which is not configured")
            pairs.append((key, by_id[tenant_id]))
        return cls(keys=tuple(pairs))

    def tenant_for(self, presented: str) -> TenantConfig | None:
        """The tenant of a key, compared in constant time per key."""
        found = None
        for key, tenant in self.keys:
            if hmac.compare_digest(key.encode(), presented.encode()):
                found = tenant
        return found

    def __call__(self, request: Request) -> TenantConfig:
        """FastAPI dependency: the caller's tenant from ``Authorization: Bearer`` or ``X-API-Key``."""
        tenant = self.tenant_for(presented_key(request))
        if tenant is None:
            raise AuthenticationError("unknown API key")
        return tenant
