"""One replica's control plane: the store, its tenant directory and its conversation recorder.

The admin API reaches the store only through :meth:`ControlPlane.run`, which runs a store
call in a worker thread under the store's time bound; a change to tenants or keys is
applied on this replica at once (the others follow at their next poll).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from services.config import ControlPlaneConfig
from services.control_plane import insights
from services.control_plane.directory import TenantDirectory
from services.control_plane.recorder import ConversationRecorder
from services.control_plane.store import ControlPlaneStore, ControlPlaneUnavailableError

T = TypeVar("T")

ForgetSessions = Callable[[str, list[str]], Awaitable[None]]


class ControlPlane:
    """Store, directory and recorder of one orchestrator replica."""

    def __init__(
        self,
        store: ControlPlaneStore,
        config: ControlPlaneConfig,
        directory: TenantDirectory,
        recorder: ConversationRecorder,
        forget_sessions: ForgetSessions | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.directory = directory
        self.recorder = recorder
        self._forget_sessions = forget_sessions

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """A store call in a worker thread, bounded by ``store_timeout_s``.

        Raises:
            ControlPlaneUnavailableError: the store failed or did not answer in time.

        """
        try:
            return await asyncio.wait_for(asyncio.to_thread(call, *args), self.config.store_timeout_s * 2)
        except TimeoutError as err:
            raise ControlPlaneUnavailableError("the control-plane store did not answer in time") from err

    async def changed(self, call: Callable[..., T], *args: Any) -> T:
        """A store call that changes tenants or keys; this replica serves the change before it returns."""
        result = await self.run(call, *args)
        await self.directory.refresh()
        return result

    async def insights(self, tenant: str, start: datetime, end: datetime, similarity: float | None) -> dict[str, Any]:
        """Rates, rates per day, unanswered clusters and the worst-rated answers of a tenant's period."""

        def query() -> dict[str, Any]:
            with self.store.session() as session:
                return {
                    "tenant": tenant,
                    "start": start.isoformat(),
                    "end": end.isoformat(),
                    "rates": insights.rates(session, tenant, start, end),
                    "daily": insights.daily(session, tenant, start, end),
                    "unanswered": [
                        c.__dict__
                        for c in insights.unanswered_clusters(
                            session, tenant, start, end, similarity=similarity or self.config.cluster_similarity
                        )
                    ],
                    "worst_rated": insights.worst_rated(session, tenant, start, end),
                }

        return await self.run(query)

    async def gap_report(self, tenant: str, start: datetime, end: datetime, fmt: str, similarity: float | None) -> str:
        """The knowledge-gap report of a tenant's period (CSV or JSONL)."""

        def query() -> str:
            with self.store.session() as session:
                clusters = insights.unanswered_clusters(
                    session,
                    tenant,
                    start,
                    end,
                    similarity=similarity or self.config.cluster_similarity,
                    top=1000,
                    examples=5,
                )
            return insights.gap_report(clusters, fmt)

        return await self.run(query)

    async def training_data(self, tenant: str) -> list[dict[str, str]]:
        """The tenant's reviewed pairs as alpaca records."""
        return insights.alpaca_records(await self.run(self.store.reviewed_pairs, tenant))

    async def erase_shopper(self, tenant: str, user_id: str) -> dict[str, Any]:
        """Delete every record, feedback and review of one shopper, and their conversations in session memory."""
        await self.recorder.drained()  # what this replica still holds of them is written first, then erased
        erased = await self.run(self.store.erase_shopper, tenant, self.recorder.user_hash(tenant, user_id))
        if self._forget_sessions is not None:
            await self._forget_sessions(tenant, erased["sessions"])
        return {k: v for k, v in erased.items() if k != "sessions"} | {"sessions": len(erased["sessions"])}

    async def purge(self) -> dict[str, int]:
        """Apply every tenant's retention now."""
        return await self.run(self.store.purge, datetime.now(UTC), self.config.retention_days)

    async def close(self) -> None:
        """Stop the poller and the writer; close the pool."""
        await self.directory.close()
        await self.recorder.close()
        self.store.close()
