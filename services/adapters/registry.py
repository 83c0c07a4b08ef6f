"""The adapter registry: versions in the store, and which version each tenant uses.

State lives in ``registry.json`` inside the adapter store (a local folder on a dev box,
a shared volume in Kubernetes), so it survives restarts and every replica reads the same
thing. Writers take an exclusive ``flock`` on a lock file and replace the state file
atomically (write, fsync, rename): a crash leaves the old or the new state, never half.

Layout of the store::

    <store>/registry.json
    <store>/<adapter name>/<version>/adapter_config.json, adapter_model.safetensors

Adapters are addressed as ``name@version``, which is also the multiplexed model id the
LLM deployment routes and caches by: a new version is a new id, so requests in flight
keep the version they started with.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, StrictFloat, StrictInt

from services.adapters.validation import AdapterSpec
from services.errors import ConflictError, InvalidRequestError, NotFoundError, ServiceError


class UnknownAdapterError(InvalidRequestError):
    """A request body names an adapter version that is not registered (400: the URL's resource exists)."""

    code = "unknown_adapter"


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
STATE_FILE = "registry.json"
LOCK_FILE = ".registry.lock"


def adapter_id(name: str, version: str) -> str:
    """The id an adapter version is routed and cached by."""
    return f"{name}@{version}"


class Evaluation(BaseModel):
    """A ``cs-eval`` run against a version: whether it met every threshold, and its overall figures."""

    passed: bool = Field(strict=True)
    failed: list[str] = Field(default_factory=list, max_length=100, description="The thresholds it missed.")
    figures: dict[str, StrictFloat | StrictInt | None] = Field(default_factory=dict, max_length=50)
    questions: str = Field("", max_length=300, description="The question file of the run.")
    evaluated_at: datetime | None = None


class AdapterVersion(BaseModel):
    """One registered version of an adapter."""

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    rank: int
    target_modules: list[str]
    base_model: str
    registered_at: datetime
    evaluation: Evaluation | None = Field(None, description="The last cs-eval run recorded against this version.")

    @classmethod
    def validated(cls, name: str, version: str, spec: AdapterSpec) -> AdapterVersion:
        """A record for a version that passed :func:`validate_adapter_folder`, stamped now."""
        return cls(
            name=name,
            version=version,
            rank=spec.rank,
            target_modules=spec.target_modules,
            base_model=spec.base_model,
            registered_at=now(),
        )


class Canary(BaseModel):
    """A share of a tenant's sessions sent to a candidate version."""

    version: str
    percent: float = Field(gt=0, lt=100)


class TenantAdapters(BaseModel):
    """Which versions of which adapter a tenant uses."""

    adapter: str
    active: str
    history: list[str] = Field(default_factory=list, description="Earlier active versions, most recent last.")
    canary: Canary | None = None


class RegistryState(BaseModel):
    """Everything persisted."""

    revision: int = 0
    adapters: dict[str, dict[str, AdapterVersion]] = Field(default_factory=dict)
    tenants: dict[str, TenantAdapters] = Field(default_factory=dict)


def canary_bucket(tenant: str, session_id: str) -> float:
    """A stable number in [0, 100) per session: the same session always lands on the same side."""
    digest = hashlib.sha256(f"{tenant}/{session_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


class AdapterRegistry:
    """Reads and changes the registry state of one adapter store."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._state_file = store / STATE_FILE
        self._lock_file = store / LOCK_FILE
        self._cached: tuple[tuple[int, int], RegistryState] | None = None

    # -- reading ---------------------------------------------------------------------------

    def state(self) -> RegistryState:
        """The current state (empty if nothing was ever registered); treat it as read-only.

        Read on every chat request, so the parsed state is cached until the file changes;
        writers replace the file, so its inode changes with every write. Writers never
        touch this cached object: a transaction parses its own copy from disk.
        """
        try:
            stat = self._state_file.stat()
        except FileNotFoundError:
            return RegistryState()
        key = (stat.st_mtime_ns, stat.st_ino)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._read())
        return self._cached[1]

    def _read(self) -> RegistryState:
        if not self._state_file.exists():
            return RegistryState()
        return RegistryState.model_validate_json(self._state_file.read_bytes())

    def version_path(self, name: str, version: str) -> Path:
        """Folder of an adapter version in the store."""
        return self.store / name / version

    def resolve(self, tenant: str, session_id: str) -> str | None:
        """The adapter id a tenant's session uses now, honouring a canary; None for the base model."""
        rollout = self.state().tenants.get(tenant)
        if rollout is None:
            return None
        version = rollout.active
        if rollout.canary is not None and canary_bucket(tenant, session_id) < rollout.canary.percent:
            version = rollout.canary.version
        return adapter_id(rollout.adapter, version)

    # -- changing --------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[RegistryState]:
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self._lock_file, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read()  # under the lock, never the shared cache
                yield state
                state.revision += 1
                fd, tmp = tempfile.mkstemp(dir=self.store, prefix=".registry-", suffix=".json")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as out:
                        out.write(state.model_dump_json(indent=2))
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(tmp, self._state_file)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def register(self, record: AdapterVersion) -> AdapterVersion:
        """Record a validated version whose folder is already in the store."""
        if not self.version_path(record.name, record.version).is_dir():
            raise NotFoundError(f"no folder {record.name}/{record.version} in the adapter store")
        with self._transaction() as state:
            versions = state.adapters.setdefault(record.name, {})
            if record.version in versions:
                raise ConflictError(f"adapter {adapter_id(record.name, record.version)} is already registered")
            versions[record.version] = record
        return record

    def record_evaluation(self, name: str, version: str, evaluation: Evaluation) -> AdapterVersion:
        """Keep a cs-eval result with the version (the last one replaces the one before).

        Raises:
            NotFoundError: the version is not registered.

        """
        with self._transaction() as state:
            record = self._require(state, name, version)
            record.evaluation = evaluation.model_copy(update={"evaluated_at": now()})
            return record

    def activate(self, tenant: str, name: str, version: str) -> TenantAdapters:
        """Make a version the tenant's active one; the previous one is kept for rollback.

        Raises:
            UnknownAdapterError: the version is not registered (the request names it, not the URL).

        """
        with self._transaction() as state:
            self._require(state, name, version, UnknownAdapterError)
            rollout = state.tenants.get(tenant)
            if rollout is None:
                rollout = state.tenants[tenant] = TenantAdapters(adapter=name, active=version)
            elif (rollout.adapter, rollout.active) != (name, version):
                rollout.history.append(adapter_id(rollout.adapter, rollout.active))
                rollout.adapter, rollout.active, rollout.canary = name, version, None
            return rollout

    def rollback(self, tenant: str) -> TenantAdapters | None:
        """Undo the tenant's last activation.

        Returns:
            The restored state, or None when the first activation was undone (base model).

        """
        with self._transaction() as state:
            rollout = state.tenants.get(tenant)
            if rollout is None:
                raise ConflictError(f"tenant {tenant!r} has no adapter activation to roll back")
            if not rollout.history:
                del state.tenants[tenant]
                return None
            name, _, version = rollout.history.pop().partition("@")
            self._require(state, name, version)
            rollout.adapter, rollout.active, rollout.canary = name, version, None
            return rollout

    def start_canary(self, tenant: str, version: str, percent: float) -> TenantAdapters:
        """Send ``percent`` of the tenant's sessions to another version of its adapter."""
        with self._transaction() as state:
            rollout = state.tenants.get(tenant)
            if rollout is None:
                raise ConflictError(f"tenant {tenant!r} has no active adapter; activate one before a canary")
            self._require(state, rollout.adapter, version, UnknownAdapterError)
            if version == rollout.active:
                raise InvalidRequestError(f"version {version!r} is already active for {tenant!r}")
            rollout.canary = Canary(version=version, percent=percent)
            return rollout

    def promote_canary(self, tenant: str) -> TenantAdapters:
        """Make the canary version the active one."""
        canary = self._canary_of(tenant)
        return self.activate(tenant, self.state().tenants[tenant].adapter, canary.version)

    def abort_canary(self, tenant: str) -> TenantAdapters:
        """Send every session back to the active version."""
        self._canary_of(tenant)
        with self._transaction() as state:
            rollout = state.tenants[tenant]
            rollout.canary = None
            return rollout

    def delete(self, name: str, version: str) -> None:
        """Forget a version; refused while any tenant uses it (active, canary or rollback target)."""
        with self._transaction() as state:
            self._require(state, name, version)
            wanted = adapter_id(name, version)
            for tenant, rollout in state.tenants.items():
                in_use = {adapter_id(rollout.adapter, rollout.active)}
                if rollout.canary:
                    in_use.add(adapter_id(rollout.adapter, rollout.canary.version))
                if wanted in in_use:
                    raise ConflictError(f"adapter {wanted} is in use by tenant {tenant!r}; activate another first")
                if wanted in rollout.history:
                    rollout.history = [h for h in rollout.history if h != wanted]
            del state.adapters[name][version]
            if not state.adapters[name]:
                del state.adapters[name]

    def _canary_of(self, tenant: str) -> Canary:
        rollout = self.state().tenants.get(tenant)
        if rollout is None or rollout.canary is None:
            raise ConflictError(f"tenant {tenant!r} has no canary running")
        return rollout.canary

    @staticmethod
    def _require(
        state: RegistryState, name: str, version: str, error: type[ServiceError] = NotFoundError
    ) -> AdapterVersion:
        record = state.adapters.get(name, {}).get(version)
        if record is None:
            raise error(f"adapter {adapter_id(name, version)} is not registered")
        return record


def now() -> datetime:
    """Timestamp for new records."""
    return datetime.now(UTC)
