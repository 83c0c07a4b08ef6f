"""Operator actions on adapters: validate and register versions, activate, canary, roll back."""

from __future__ import annotations

import asyncio
import io
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from services.adapters.registry import AdapterRegistry, AdapterVersion, TenantAdapters, adapter_id
from services.adapters.validation import validate_adapter_folder
from services.errors import ConflictError, InvalidAdapterError, ServiceError

MAX_ARCHIVE_BYTES = 2 * 1024**3


def unpack_archive(data: bytes, dest: Path) -> Path:
    """Unpack a .tar(.gz) or .zip adapter archive into ``dest``; return the adapter folder in it.

    Members with absolute paths, ``..``, links or devices are refused (no writes outside
    ``dest``). The adapter folder is the archive root or its single top-level folder.

    Raises:
        InvalidAdapterError: not an archive, an unsafe member, or no adapter_config.json.

    """
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        with zipfile.ZipFile(buffer) as archive:
            for name in archive.namelist():
                _check_member(name)
            archive.extractall(dest)
    else:
        buffer.seek(0)
        try:
            with tarfile.open(fileobj=buffer, mode="r:*") as archive:
                for member in archive.getmembers():
                    _check_member(member.name)
                    if not (member.isfile() or member.isdir()):
                        raise InvalidAdapterError(f"archive member {member.name!r} is not a regular file")
                archive.extractall(dest, filter="data")
        except tarfile.TarError as err:
            raise InvalidAdapterError(f"upload is neither a zip nor a tar archive: {err}") from err
    if (dest / "adapter_config.json").is_file():
        return dest
    children = [c for c in dest.iterdir() if c.is_dir()]
    if len(children) == 1 and (children[0] / "adapter_config.json").is_file():
        return children[0]
    raise InvalidAdapterError("archive holds no adapter_config.json at its root or in one top-level folder")


def _check_member(name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidAdapterError(f"archive member {name!r} points outside the adapter folder")


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
        return await asyncio.to_thread(self.registry.register, AdapterVersion.validated(name, version, spec))

    async def register_archive(self, name: str, version: str, data: bytes) -> AdapterVersion:
        """Unpack an uploaded adapter into ``<store>/name/version``, then validate and register it.

        Nothing is left in the store when validation fails.
        """
        if len(data) > MAX_ARCHIVE_BYTES:
            raise InvalidAdapterError(f"archive is {len(data)} bytes; the limit is {MAX_ARCHIVE_BYTES}")
        target = self.registry.version_path(name, version)
        if target.exists():
            raise ConflictError(f"{name}/{version} exists in the adapter store already")
        target.parent.mkdir(parents=True, exist_ok=True)

        def unpack() -> None:
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".upload-{version}-") as tmp:
                folder = unpack_archive(data, Path(tmp))
                folder.rename(target)

        await asyncio.to_thread(unpack)
        try:
            return await self.register(name, version)
        except ServiceError:
            await asyncio.to_thread(shutil.rmtree, target, True)
            raise

    async def activate(self, tenant: str, name: str, version: str) -> TenantAdapters:
        """Switch a tenant to a version; requests in flight finish on the old one."""
        return await asyncio.to_thread(self.registry.activate, tenant, name, version)

    async def rollback(self, tenant: str) -> TenantAdapters | None:
        """Switch a tenant back to its previous version (None: back to the base model)."""
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
