"""Tenants and keys as one orchestrator replica serves them: the store's, polled in the background.

A request's key is looked up in memory (a dict by digest), never in the store. Every
``refresh_interval_s`` the replica reads the store's revision and, when it moved, reloads
tenants and keys; so a change made through any replica (or the CLI) is served by every
replica within one interval plus one read, without a restart. Until the store has been
read, and whenever it cannot be, the replica serves what it read last, or the config
file's tenants and keys (the seed), so chats go on while the store is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from services.config import TenantConfig
from services.control_plane.store import ControlPlaneStore, KeyGrant, KeyScope, Snapshot
from services.errors import ServiceError
from services.observability.metrics import Metrics
from services.security import key_digest, presented_key_digest

logger = logging.getLogger(__name__)

SeedKeys = dict[str, tuple[KeyScope, str | None]]
"""Key digest -> (scope, tenant) of the keys the config file and ``CS_*`` variables give."""


def seed_keys(tenants: list[TenantConfig], admin_keys: list[str], env_keys: dict[str, str]) -> SeedKeys:
    """The keys of the config file (tenants' storefront, operator and ingest keys, admin keys) and of ``CS_API_KEYS``.

    Args:
        tenants: The config's tenants.
        admin_keys: Admin keys or digests (config and ``CS_ADMIN_KEYS``).
        env_keys: ``CS_API_KEYS``: storefront key or digest -> tenant id.

    Raises:
        ValueError: an environment key names a tenant the config does not define, or a key
            is given twice with different grants.

    """
    known = {t.tenant for t in tenants}
    pairs: list[tuple[str, KeyScope, str | None]] = []
    for t in tenants:
        for scope, given in (
            (KeyScope.STOREFRONT, t.api_keys),
            (KeyScope.OPERATOR, t.operator_api_keys),
            (KeyScope.INGEST, t.ingest_api_keys),
        ):
            pairs += [(key_digest(k.get_secret_value()), scope, t.tenant) for k in given]
    for key, owner in env_keys.items():
        if owner not in known:
            raise ValueError(f"CS_API_KEYS names tenant {owner!r}, which is not configured")
        pairs.append((key_digest(key), KeyScope.STOREFRONT, owner))
    pairs += [(key_digest(k), KeyScope.ADMIN, None) for k in admin_keys]
    keys: SeedKeys = {}
    for digest, scope, tenant in pairs:
        if keys.setdefault(digest, (scope, tenant)) != (scope, tenant):
            raise ValueError("an API key is given to more than one tenant or scope")
    return keys


class TenantDirectory:
    """The tenants and valid keys one replica serves."""

    def __init__(
        self,
        tenants: list[TenantConfig],
        keys: SeedKeys,
        store: ControlPlaneStore | None = None,
        *,
        refresh_interval_s: float = 2.0,
        metrics: Metrics | None = None,
        setup: Callable[[], None] | None = None,
    ) -> None:
        """Serve the seed until the store (when given) has been read.

        ``setup`` (migrate and seed the store) runs before the first read, and again at each
        refresh until it succeeds once: a replica that started while the store was down
        sets it up when it comes back.
        """
        self._store = store
        self._setup = setup
        self._interval_s = refresh_interval_s
        self._metrics = metrics or Metrics()
        self._snapshot = Snapshot(
            revision=-1,
            tenants={t.tenant: t for t in tenants},
            keys={
                digest: KeyGrant(f"config:{digest[7:19]}", scope, tenant) for digest, (scope, tenant) in keys.items()
            },
        )
        self._used: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls, tenants: list[TenantConfig], *, admin_keys: list[str] | None = None, env_keys: dict[str, str] | None = None
    ) -> TenantDirectory:
        """A directory of the config's tenants and keys only (no store)."""
        return cls(tenants, seed_keys(tenants, admin_keys or [], env_keys or {}))

    @property
    def revision(self) -> int:
        """The store revision served; -1 while serving the config's seed."""
        return self._snapshot.revision

    @property
    def tenant_ids(self) -> set[str]:
        """Every tenant served."""
        return set(self._snapshot.tenants)

    def tenant(self, tenant: str) -> TenantConfig | None:
        """A tenant's profile, or None."""
        return self._snapshot.tenants.get(tenant)

    def has_scope(self, scope: KeyScope) -> bool:
        """Whether any key of ``scope`` exists (a rotated one included)."""
        return any(g.scope is scope for g in self._snapshot.keys.values())

    def grant(self, presented: str, now: datetime) -> KeyGrant | None:
        """What a presented key grants now (looked up by digest), or None for an unknown, revoked or expired key."""
        self.start()
        grant = self._snapshot.keys.get(presented_key_digest(presented))
        if grant is None or not grant.valid_at(now):
            return None
        if grant.tenant is not None and grant.tenant not in self._snapshot.tenants:
            return None
        self._used[grant.key_id] = now
        return grant

    def load(self) -> None:
        """Set up and read the store now (blocking: a replica's start); on failure the seed stays."""
        if self._store is None:
            return
        try:
            self._set_up()
            self._snapshot = self._store.snapshot()
            self._metrics.set("cs_control_plane_revision", self._snapshot.revision, {})
        except ServiceError as err:
            self._metrics.inc("cs_control_plane_refresh_failures", {})
            logger.warning("control plane not read, serving the config's tenants and keys: %s", err.message)

    async def refresh(self) -> bool:
        """Reload tenants and keys if the store's revision moved; True when it did.

        Also writes when this replica's keys were last used. A store that cannot be read
        changes nothing here (counted in ``cs_control_plane_refresh_failures``).
        """
        store = self._store
        if store is None:
            return False
        used, self._used = self._used, {}
        try:
            await asyncio.to_thread(self._set_up)
            revision = await asyncio.to_thread(store.revision)
            changed = revision != self._snapshot.revision
            if changed:
                self._snapshot = await asyncio.to_thread(store.snapshot)
                self._metrics.set("cs_control_plane_revision", self._snapshot.revision, {})
            real = {k: v for k, v in used.items() if not k.startswith("config:")}
            await asyncio.to_thread(store.touch_keys, real)
            return changed
        except ServiceError as err:
            self._used = used | self._used
            self._metrics.inc("cs_control_plane_refresh_failures", {})
            logger.warning("control plane not read, keeping revision %d: %s", self._snapshot.revision, err.message)
            return False

    def _set_up(self) -> None:
        if self._setup is not None:
            self._setup()
            self._setup = None

    def start(self) -> None:
        """Start polling the store (inside the replica's event loop); the first lookup starts it too."""
        if self._store is None or (self._task is not None and not self._task.done()):
            return
        with contextlib.suppress(RuntimeError):  # no running loop: a synchronous caller (a CLI, a test)
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the poller must outlive any one failure
                logger.exception("control plane refresh failed")
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
