"""Operator actions on adapters: validate and register versions, activate, canary, roll back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.adapters.registry import AdapterRegistry, AdapterVersion, TenantAdapters, adapter_id, now
from services.adapters.validation import validate_adapter_folder


class AdapterLoadCheck(Protocol):
    """Loads an adapter into the running engine and unloads it (the final validation)."""

    async def __call__(self, adapter: str) -> None:
        """Raise when the engine refuses the adapter."""
        ...


@dataclass
class AdapterAdmin:
    """The adapter lifecycle behind the admin API."""

    registry: AdapterRegistry
    engine_model: str
    max_rank: int
    load_check: AdapterLoadCheck

    async def register(self, name: str, version: str) -> AdapterVersion:
        """Validate ``<store>/name/version`` (files, then a real load in the engine) and record it."""
        path: Path = self.registry.version_path(name, version)
        spec = await asyncio.to_thread(
            validate_adapter_folder, path, engine_model=self.engine_model, max_rank=self.max_rank
        )
        await self.load_check(adapter_id(name, version))
        record = AdapterVersion(
            name=name,
            version=version,
            rank=spec.rank,
            target_modules=spec.target_modules,
            base_model=spec.base_model,
            registered_at=now(),
        )
        return await asyncio.to_thread(self.registry.register, record)

    async def activate(self, tenant: str, name: str, version: str) -> TenantAdapters:
        """Switch a tenant to a version; requests in flight finish on the old one."""
        return await asyncio.to_thread(self.registry.activate, tenant, name, version)

    async def rollback(self, tenant: str) -> TenantAdapters:
        """Switch a tenant back to its previous version."""
        return await asyncio.to_thread(self.registry.rollback, tenant)

    async def start_canary(self, tenant: str, version: str, percent: float) -> TenantAdapters:
        """Send a sticky share of the tenant's sessions to another version."""
        return await asyncio.to_thread(self.registry.start_canary, tenant, version, percent)

    async def promote_canary(self, tenant: str) -> TenantAdapters:
        """Make the canary the active version."""
        return await asyncio.to_thread(self.registry.promote_canary, tenant)

    async def abort_canary(self, tenant: str) -> TenantAdapters:
        """End the canary; every session uses the active version."""
        return await asyncio.to_thread(self.registry.abort_canary, tenant)

    async def delete(self, name: str, version: str) -> None:
        """Forget a version that no tenant uses."""
        await asyncio.to_thread(self.registry.delete, name, version)
