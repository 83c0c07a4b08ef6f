"""Conversation records and feedback, written to the store off the hot path.

A reply is handed to :meth:`ConversationRecorder.record` as it is given: that puts it on a
bounded in-memory queue and returns at once. One background task per replica redacts the
text and writes batches from a worker thread. A chat never waits on the store and never
fails because of it: a full queue or a failed write drops the batch, counted in
``cs_record_misses`` with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from services.config import ControlPlaneConfig, TenantConfig
from services.control_plane.redaction import Redactor
from services.control_plane.store import ControlPlaneStore, NewRecord
from services.errors import ServiceError
from services.observability.metrics import Metrics
from services.security import shopper_hash

logger = logging.getLogger(__name__)

#: Record outcomes; a reply's ``tool_failed`` is an ``error``, an answer that took an action is ``tool``.
RECORD_OUTCOMES = ("answered", "fallback", "handover", "guardrail", "tool", "error")
#: Outcomes whose question is kept with its embedding: the ones insights cluster as unanswered.
UNANSWERED = ("fallback", "handover")


def record_outcome(reply_outcome: str, actions: list[dict[str, Any]]) -> str:
    """The record's outcome for a reply's outcome and the actions it took."""
    if reply_outcome == "tool_failed":
        return "error"
    if reply_outcome == "answered" and any(a.get("type") not in (None, "handoff", "guardrail") for a in actions):
        return "tool"
    return reply_outcome if reply_outcome in RECORD_OUTCOMES else "error"


def vector_bytes(vector: list[float] | None) -> bytes | None:
    """An embedding as stored: unit-length float16 (half the bytes, plenty for clustering)."""
    if not vector:
        return None
    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array))
    return (array / norm if norm else array).astype(np.float16).tobytes()


@dataclass(frozen=True)
class _Pending:
    kind: str  # record or feedback
    tenant: TenantConfig
    payload: Any


class ConversationRecorder:
    """The queue and writer of one replica's records and feedback."""

    def __init__(
        self, store: ControlPlaneStore, config: ControlPlaneConfig, secret: bytes | None, metrics: Metrics
    ) -> None:
        self._store = store
        self._config = config
        self._secret = secret
        self._metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._redactors: dict[tuple[str, ...], Redactor] = {}

    def user_hash(self, tenant: str, user_id: str) -> str:
        """What stands for this shopper in records (the same on every replica sharing the secret)."""
        return shopper_hash(tenant, user_id, self._secret)

    def record(self, tenant: TenantConfig, record: NewRecord, vector: list[float] | None = None) -> None:
        """Queue one reply's record (raw text: the writer redacts it); never blocks.

        The question's embedding ``vector`` is kept only when the question went unanswered:
        those are the questions insights cluster.
        """
        if vector is not None and record.outcome in UNANSWERED:
            record = replace(record, question_vector=vector_bytes(vector))
        self._put(_Pending("record", tenant, record))

    def feedback(
        self, tenant: TenantConfig, reply_id: str, user_id: str, helpful: bool | None, resolved: bool | None
    ) -> None:
        """Queue a shopper's verdict on a reply; never blocks."""
        self._put(_Pending("feedback", tenant, (reply_id, self.user_hash(tenant.tenant, user_id), helpful, resolved)))

    def _put(self, item: _Pending) -> None:
        if len(self._queue) >= self._config.record_queue_size:
            self._metrics.inc("cs_record_misses", {"kind": item.kind, "reason": "queue_full"})
            return
        self._queue.append(item)
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def drained(self) -> None:
        """Wait until everything queued so far was written or counted as missed."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._config.record_batch_size))]
                await self._write(batch)
            self._idle.set()

    async def _write(self, batch: list[_Pending]) -> None:
        records = [self._redacted(item) for item in batch if item.kind == "record"]
        feedback = [item for item in batch if item.kind == "feedback"]
        for kind, count, write in (
            ("record", len(records), lambda: self._store.write_records(records)),
            ("feedback", len(feedback), lambda: self._write_feedback(feedback)),
        ):
            if not count:
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(write), self._config.store_timeout_s * 2)
                self._metrics.inc("cs_records_written", {"kind": kind}, count)
            except (ServiceError, TimeoutError, OSError) as err:
                logger.warning("%d conversation %s(s) not written: %s", count, kind, getattr(err, "message", err))
                self._metrics.inc("cs_record_misses", {"kind": kind, "reason": "store_unavailable"}, count)
            except Exception:  # a bad record must not stop the writer: it is logged and counted
                logger.exception("%d conversation %s(s) not written", count, kind)
                self._metrics.inc("cs_record_misses", {"kind": kind, "reason": "store_unavailable"}, count)

    def _write_feedback(self, items: list[_Pending]) -> None:
        self._store.write_feedback([(item.tenant.tenant, *item.payload) for item in items])

    def _redacted(self, item: _Pending) -> NewRecord:
        record: NewRecord = item.payload
        redact = self._redactor(item.tenant)
        return replace(record, question=redact(record.question), answer=redact(record.answer))

    def _redactor(self, tenant: TenantConfig) -> Redactor:
        key = (tenant.tenant, *tenant.order_id_patterns)
        if key not in self._redactors:
            self._redactors[key] = Redactor(self._config.redact, tenant.order_id_patterns)
        return self._redactors[key]

    async def close(self) -> None:
        """Stop the writer (what is still queued is dropped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
