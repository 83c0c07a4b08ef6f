"""The control-plane store: tenants and keys, conversation records, feedback and reviews.

Every method is synchronous and short; the orchestrator calls them from worker threads
(``asyncio.to_thread``), never on its event loop. A store that cannot be reached raises
:class:`ControlPlaneUnavailableError` (a 503 naming the store), never an empty result.
Each change to tenants or keys increments the one revision row in the same transaction,
so a replica that polls the revision sees every change once it is committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.config import StandardReplies, TenantConfig
from services.config.orchestrator import TenantWidget
from services.config.tools import TenantTools
from services.control_plane import schema
from services.control_plane.models import ApiKey, ConversationRecord, Feedback, Review, Revision, Tenant, utcnow
from services.errors import ConflictError, DependencyUnavailableError, NotFoundError
from services.security import key_digest, new_api_key


class ControlPlaneUnavailableError(DependencyUnavailableError):
    """The control-plane store cannot be reached or did not answer in time."""

    code = "control_plane_unavailable"


class KeyScope(StrEnum):
    """What a key may do."""

    STOREFRONT = "storefront"  # a tenant's storefront backend: /v1 chat, sessions, feedback
    OPERATOR = "operator"  # a tenant's operators: its insights, records, reviews, exports; chat as its assistant
    INGEST = "ingest"  # a tenant's knowledge-sync job: its knowledge, nothing else
    ADMIN = "admin"  # the platform: everything, every tenant


@dataclass(frozen=True)
class KeyGrant:
    """What a valid key grants: read from the store, kept in each replica's directory."""

    key_id: str
    scope: KeyScope
    tenant: str | None
    expires_at: datetime | None = None

    def valid_at(self, now: datetime) -> bool:
        """False once a rotated key's grace period is over."""
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True)
class Snapshot:
    """Tenants and valid keys at one revision of the store."""

    revision: int
    tenants: dict[str, TenantConfig]
    keys: dict[str, KeyGrant]  # by key digest


@dataclass(frozen=True)
class IssuedKey:
    """A new key: the only moment its plain text exists outside the caller."""

    key: str
    info: dict[str, Any]


@dataclass(frozen=True)
class NewRecord:
    """One reply to record (text already redacted)."""

    reply_id: str
    tenant: str
    user_hash: str
    session_id: str | None
    question: str
    answer: str
    sources: list[dict[str, Any]]
    confidence: float
    intent: str | None
    outcome: str
    adapter: str | None
    cached: bool
    latency_ms: float
    created_at: datetime
    question_vector: bytes | None = None


#: The profile fields of a tenant that the admin API may set.
PROFILE_FIELDS = (
    "persona",
    "fallback_message",
    "relevance_threshold",
    "adapter",
    "tools",
    "retention_days",
    "order_id_patterns",
    "standard_replies",
    "widget",
)


def tenant_config(row: Tenant) -> TenantConfig:
    """The runtime profile of a stored tenant (its keys live in the directory, not here)."""
    options = row.options or {}
    return TenantConfig(
        tenant=row.tenant,
        persona=row.persona,
        fallback_message=row.fallback_message,
        relevance_threshold=row.relevance_threshold,
        adapter=row.adapter,
        retention_days=row.retention_days,
        tools=TenantTools(
            enabled=row.tools_enabled, storefront_url=row.storefront_url, credentials_env=row.credentials_env
        ),
        order_id_patterns=options.get("order_id_patterns", []),
        widget=TenantWidget.model_validate(options.get("widget") or {}),
        standard_replies=StandardReplies.model_validate(options["standard_replies"])
        if options.get("standard_replies")
        else None,
    )


def _apply_profile(row: Tenant, profile: TenantConfig) -> None:
    row.persona = profile.persona
    row.fallback_message = profile.fallback_message
    row.relevance_threshold = profile.relevance_threshold
    row.adapter = profile.adapter
    row.retention_days = profile.retention_days
    row.tools_enabled = profile.tools.enabled
    row.storefront_url = profile.tools.storefront_url
    row.credentials_env = profile.tools.credentials_env
    row.options = {
        "order_id_patterns": profile.order_id_patterns,
        "standard_replies": profile.standard_replies.model_dump() if profile.standard_replies else None,
        "widget": profile.widget.model_dump(),
    }


def key_info(row: ApiKey) -> dict[str, Any]:
    """A key as the admin API shows it: everything but its digest."""
    fields = ("key_id", "scope", "tenant", "label", "origin", "replaced_by")
    times = ("created_at", "last_used_at", "rotated_at", "expires_at", "revoked_at")
    info: dict[str, Any] = {f: getattr(row, f) for f in fields}
    info |= {t: getattr(row, t).isoformat() if getattr(row, t) else None for t in times}
    return info


def _new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


class ControlPlaneStore:
    """SQL access to the control plane (SQLite or PostgreSQL, by URL)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url
        self._sqlite = url.startswith("sqlite")
        if self._sqlite:
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": timeout_s})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # Bounded connects and statements: an unreachable or stuck server is an error within timeout_s.
            statement_ms = int(timeout_s * 1000)
            self.engine = create_engine(
                url,
                pool_pre_ping=True,
                pool_timeout=timeout_s,
                connect_args={
                    "connect_timeout": max(1, int(timeout_s)),
                    "options": f"-c statement_timeout={statement_ms}",
                },
            )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    # --- schema ---------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision; safe when several replicas start at once."""
        with self._errors(), self._migration_lock():
            schema.upgrade(self.engine)

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if not self._sqlite:
            # A session-level advisory lock: the second replica waits, then finds the schema current.
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT pg_advisory_lock(7466113)")
                try:
                    yield
                finally:
                    connection.exec_driver_sql("SELECT pg_advisory_unlock(7466113)")
                    connection.commit()
            return
        path = self.url.split(":///", 1)[-1]
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.migrate.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the connection pool."""
        self.engine.dispose()

    # --- plumbing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as err:
            if isinstance(err, IntegrityError):
                raise
            raise ControlPlaneUnavailableError(
                f"the control-plane store is unavailable: {type(err.orig).__name__ if err.orig else 'error'}"
            ) from err

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on an error."""
        with self._errors(), self._sessions.begin() as session:
            yield session

    @staticmethod
    def _bump(session: Session) -> None:
        session.execute(update(Revision).where(Revision.id == 1).values(value=Revision.value + 1, changed_at=utcnow()))

    # --- tenants and keys -----------------------------------------------------------------------

    def revision(self) -> int:
        """The revision of tenants and keys: it moves on every change."""
        with self.session() as session:
            return int(session.scalar(select(Revision.value).where(Revision.id == 1)) or 0)

    def snapshot(self) -> Snapshot:
        """Every tenant and every key not revoked, read in one transaction."""
        with self.session() as session:
            revision = int(session.scalar(select(Revision.value).where(Revision.id == 1)) or 0)
            tenants = {row.tenant: tenant_config(row) for row in session.scalars(select(Tenant))}
            keys = {
                row.digest: KeyGrant(row.key_id, KeyScope(row.scope), row.tenant, row.expires_at)
                for row in session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None)))
            }
        return Snapshot(revision, tenants, keys)

    def seed(self, tenants: list[TenantConfig], keys: dict[str, tuple[KeyScope, str | None]]) -> None:
        """Import the config file's tenants and keys (digest -> scope, tenant).

        A tenant the config owns is updated to the config's profile; one changed through
        the admin API since is left as it is. A key is added once: a key revoked in the
        store stays revoked, and a seeded key no longer in the config is revoked.
        Replicas seeding at once may collide on an insert; the loser's run is repeated.
        """
        for attempt in range(3):
            try:
                with self.session() as session:
                    self._seed(session, tenants, keys)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _seed(
        self, session: Session, tenants: list[TenantConfig], keys: dict[str, tuple[KeyScope, str | None]]
    ) -> None:
        changed = False
        stored = {row.tenant: row for row in session.scalars(select(Tenant))}
        for profile in tenants:
            row = stored.get(profile.tenant)
            if row is None:
                row = Tenant(tenant=profile.tenant, managed_by="config")
                _apply_profile(row, profile)
                session.add(row)
                changed = True
            elif row.managed_by == "config" and tenant_config(row) != _without_keys(profile):
                _apply_profile(row, profile)
                row.updated_at = utcnow()
                changed = True
        session.flush()
        present = {key.digest: key for key in session.scalars(select(ApiKey))}
        for digest, (scope, tenant) in keys.items():
            if digest not in present:
                session.add(ApiKey(key_id=_new_key_id(), digest=digest, scope=scope, tenant=tenant, origin="config"))
                changed = True
        for digest, key in present.items():
            if key.origin == "config" and key.revoked_at is None and digest not in keys:
                key.revoked_at = utcnow()
                changed = True
        if changed:
            self._bump(session)

    def tenants(self) -> list[TenantConfig]:
        """Every tenant's profile."""
        with self.session() as session:
            return [tenant_config(row) for row in session.scalars(select(Tenant).order_by(Tenant.tenant))]

    def tenant(self, tenant: str) -> TenantConfig:
        """One tenant's profile.

        Raises:
            NotFoundError: no such tenant.

        """
        with self.session() as session:
            return tenant_config(self._tenant_row(session, tenant))

    @staticmethod
    def _tenant_row(session: Session, tenant: str) -> Tenant:
        row = session.get(Tenant, tenant)
        if row is None:
            raise NotFoundError(f"tenant {tenant!r} does not exist")
        return row

    def create_tenant(self, profile: TenantConfig) -> TenantConfig:
        """Add a tenant (owned by the admin API from now on).

        Raises:
            ConflictError: a tenant with this id exists.

        """
        try:
            with self.session() as session:
                if session.get(Tenant, profile.tenant) is not None:
                    raise ConflictError(f"tenant {profile.tenant!r} exists already")
                row = Tenant(tenant=profile.tenant, managed_by="api")
                _apply_profile(row, profile)
                session.add(row)
                self._bump(session)
        except IntegrityError as err:
            raise ConflictError(f"tenant {profile.tenant!r} exists already") from err
        return self.tenant(profile.tenant)

    def update_tenant(self, tenant: str, changes: dict[str, Any]) -> TenantConfig:
        """Change some profile fields of a tenant; the config's seed no longer overrides it.

        Raises:
            NotFoundError: no such tenant.
            ValueError: the changed profile is invalid (the message names the field).

        """
        unknown = sorted(set(changes) - set(PROFILE_FIELDS))
        if unknown:
            raise ValueError(f"not profile fields: {', '.join(unknown)}")
        with self.session() as session:
            row = self._tenant_row(session, tenant)
            current = tenant_config(row).model_dump()
            profile = TenantConfig.model_validate(current | changes)
            _apply_profile(row, profile)
            row.managed_by = "api"
            row.updated_at = utcnow()
            self._bump(session)
            return tenant_config(row)

    def issue_key(self, scope: KeyScope, tenant: str | None, label: str | None = None) -> IssuedKey:
        """A new key of ``scope`` (for ``tenant``, unless admin); its plain text is returned once.

        Raises:
            NotFoundError: no such tenant.
            ValueError: a tenant key without a tenant, or an admin key with one.

        """
        if (scope is KeyScope.ADMIN) != (tenant is None):
            raise ValueError("an admin key belongs to no tenant; every other key belongs to one")
        key = new_api_key()
        with self.session() as session:
            if tenant is not None:
                self._tenant_row(session, tenant)
            row = ApiKey(key_id=_new_key_id(), digest=key_digest(key), scope=scope, tenant=tenant, label=label)
            session.add(row)
            self._bump(session)
            session.flush()
            return IssuedKey(key, key_info(row))

    def rotate_key(self, key_id: str, grace_s: float) -> IssuedKey:
        """A replacement for a key; the old one stays valid for ``grace_s`` seconds more.

        Raises:
            NotFoundError: no such key.
            ConflictError: the key is revoked or already rotated.

        """
        key = new_api_key()
        now = utcnow()
        with self.session() as session:
            old = self._key_row(session, key_id)
            if old.revoked_at is not None or old.replaced_by is not None:
                raise ConflictError(f"key {key_id!r} is revoked or rotated already")
            new = ApiKey(
                key_id=_new_key_id(), digest=key_digest(key), scope=old.scope, tenant=old.tenant, label=old.label
            )
            session.add(new)
            old.rotated_at, old.expires_at, old.replaced_by = now, now + timedelta(seconds=grace_s), new.key_id
            self._bump(session)
            session.flush()
            return IssuedKey(key, key_info(new))

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key at once.

        Raises:
            NotFoundError: no such key.

        """
        with self.session() as session:
            row = self._key_row(session, key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                self._bump(session)
            return key_info(row)

    @staticmethod
    def _key_row(session: Session, key_id: str) -> ApiKey:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise NotFoundError(f"key {key_id!r} does not exist")
        return row

    def keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every key (of one tenant, when given), newest first."""
        query = select(ApiKey).order_by(ApiKey.created_at.desc())
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        with self.session() as session:
            return [key_info(row) for row in session.scalars(query)]

    def key(self, key_id: str) -> dict[str, Any]:
        """One key's lifecycle.

        Raises:
            NotFoundError: no such key.

        """
        with self.session() as session:
            return key_info(self._key_row(session, key_id))

    def touch_keys(self, used: dict[str, datetime]) -> None:
        """Record when keys were last used (batched by each replica; no revision change)."""
        if not used:
            return
        with self.session() as session:
            for key_id, at in used.items():
                session.execute(
                    update(ApiKey)
                    .where(ApiKey.key_id == key_id)
                    .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < at))
                    .values(last_used_at=at)
                )

    # --- conversation records, feedback, reviews ------------------------------------------------

    def write_records(self, records: list[NewRecord]) -> None:
        """Insert records in one transaction (a reply id already stored is skipped)."""
        if not records:
            return
        with self.session() as session:
            ids = [r.reply_id for r in records]
            known = set(
                session.scalars(select(ConversationRecord.reply_id).where(ConversationRecord.reply_id.in_(ids)))
            )
            session.add_all(ConversationRecord(**r.__dict__) for r in records if r.reply_id not in known)

    def add_feedback(
        self, tenant: str, reply_id: str, user_hash: str, helpful: bool | None, resolved: bool | None
    ) -> None:
        """Attach a shopper's verdict to a reply."""
        self.write_feedback([(tenant, reply_id, user_hash, helpful, resolved)])

    def write_feedback(self, verdicts: list[tuple[str, str, str, bool | None, bool | None]]) -> None:
        """Attach verdicts (tenant, reply id, shopper hash, helpful, resolved) in one transaction."""
        with self.session() as session:
            session.add_all(
                Feedback(tenant=t, reply_id=r, user_hash=u, helpful=h, resolved=v) for t, r, u, h, v in verdicts
            )

    def record(self, tenant: str, reply_id: str) -> dict[str, Any]:
        """One conversation record with its feedback and review.

        Raises:
            NotFoundError: no such record of this tenant.

        """
        with self.session() as session:
            row = session.get(ConversationRecord, reply_id)
            if row is None or row.tenant != tenant:
                raise NotFoundError(f"no conversation record {reply_id!r} of tenant {tenant!r}")
            feedback = session.scalars(select(Feedback).where(Feedback.reply_id == reply_id)).all()
            review = session.get(Review, reply_id)
            return record_view(row) | {
                "feedback": [{"helpful": f.helpful, "resolved": f.resolved} for f in feedback],
                "review": None if review is None else {"verdict": review.verdict, "answer": review.answer},
            }

    def review(self, tenant: str, reply_id: str, verdict: str, answer: str | None, reviewer: str | None) -> None:
        """Approve a recorded answer, or correct it; a second review replaces the first.

        Raises:
            NotFoundError: no such record of this tenant.
            ValueError: a correction without an answer.

        """
        if verdict == "corrected" and not (answer and answer.strip()):
            raise ValueError("a correction needs the corrected answer")
        with self.session() as session:
            row = session.get(ConversationRecord, reply_id)
            if row is None or row.tenant != tenant:
                raise NotFoundError(f"no conversation record {reply_id!r} of tenant {tenant!r}")
            session.merge(
                Review(
                    reply_id=reply_id,
                    tenant=tenant,
                    user_hash=row.user_hash,
                    verdict=verdict,
                    question=row.question,
                    answer=answer.strip() if verdict == "corrected" and answer else row.answer,
                    reviewer=reviewer,
                    created_at=utcnow(),
                )
            )

    def reviewed_pairs(self, tenant: str) -> list[tuple[str, str]]:
        """Every reviewed (question, answer) of a tenant, oldest first."""
        query = select(Review.question, Review.answer).where(Review.tenant == tenant).order_by(Review.created_at)
        with self.session() as session:
            return [(q, a) for q, a in session.execute(query)]

    def purge(self, now: datetime, default_days: int) -> dict[str, int]:
        """Delete records (and their feedback) older than each tenant's retention; counts per tenant.

        Reviewed pairs are kept: an operator made them training data on purpose.
        """
        with self.session() as session:
            retention = {t: days for t, days in session.execute(select(Tenant.tenant, Tenant.retention_days))}
            tenants = set(session.scalars(select(ConversationRecord.tenant).distinct())) | set(retention)
            purged: dict[str, int] = {}
            for tenant in sorted(tenants):
                cutoff = now - timedelta(days=retention.get(tenant) or default_days)
                old = select(ConversationRecord.reply_id).where(
                    ConversationRecord.tenant == tenant, ConversationRecord.created_at < cutoff
                )
                session.execute(delete(Feedback).where(Feedback.reply_id.in_(old)))
                result = session.execute(
                    delete(ConversationRecord).where(
                        ConversationRecord.tenant == tenant, ConversationRecord.created_at < cutoff
                    )
                )
                purged[tenant] = int(getattr(result, "rowcount", 0) or 0)
            return purged

    def erase_shopper(self, tenant: str, user_hash: str) -> dict[str, Any]:
        """Delete everything stored about one shopper of a tenant; returns the counts and their sessions."""
        with self.session() as session:
            mine = (ConversationRecord.tenant == tenant) & (ConversationRecord.user_hash == user_hash)
            sessions = sorted(
                s for s in session.scalars(select(ConversationRecord.session_id).where(mine).distinct()) if s
            )
            counts = {}
            for name, model in (("records", ConversationRecord), ("feedback", Feedback), ("reviews", Review)):
                result = session.execute(delete(model).where(model.tenant == tenant, model.user_hash == user_hash))
                counts[name] = int(getattr(result, "rowcount", 0) or 0)
            return counts | {"sessions": sessions}

    def count_records(self, tenant: str) -> int:
        """How many records a tenant has."""
        with self.session() as session:
            query = select(func.count()).select_from(ConversationRecord).where(ConversationRecord.tenant == tenant)
            return int(session.scalar(query) or 0)


def record_view(row: ConversationRecord) -> dict[str, Any]:
    """A record as the API shows it (no vector, no user hash)."""
    fields = ("reply_id", "session_id", "question", "answer", "sources", "confidence", "intent", "outcome")
    view: dict[str, Any] = {f: getattr(row, f) for f in fields}
    return view | {
        "adapter": row.adapter,
        "cached": row.cached,
        "latency_ms": row.latency_ms,
        "created_at": row.created_at.isoformat(),
    }


def _without_keys(profile: TenantConfig) -> TenantConfig:
    return profile.model_copy(update={"api_keys": [], "ingest_api_keys": [], "operator_api_keys": []})


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    # WAL: readers never wait on the writer; foreign keys are off in SQLite unless asked for.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
