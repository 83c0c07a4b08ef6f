"""Operator actions on adapters: validate and register versions, activate, canary, roll back."""

from __future__ import annotations

import asyncio
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from services.adapters.registry import AdapterRegistry, AdapterVersion, TenantAdapters, adapter_id
from services.adapters.validation import validate_adapter_folder
from services.errors import ConflictError, InvalidAdapterError

MAX_ARCHIVE_BYTES = 2 * 1024**3
#: What an archive may unpack to: a rank-64 LoRA of a 7B model is well under 1 GiB.
MAX_EXPANDED_BYTES = 4 * 1024**3
#: A PEFT folder has a handful of files; thousands are a bomb of another kind.
MAX_MEMBERS = 256


def unpack_archive(upload: IO[bytes], dest: Path) -> Path:
    """Unpack a .tar(.gz) or .zip adapter archive into ``dest``; return the adapter folder in it.

    Members with absolute paths, ``..``, links or devices are refused (no writes outside
    ``dest``), and so is an archive of more than ``MAX_MEMBERS`` members or one whose members
    add up to more than ``MAX_EXPANDED_BYTES`` (checked before anything is written; zipfile
    and tarfile stop at each member's stated size, so a member cannot expand beyond it). The
    adapter folder is the archive root or its single top-level folder.

    Raises:
        InvalidAdapterError: not an archive, an unsafe or oversized one, or no adapter_config.json.

    """
    buffer = upload
    buffer.seek(0)
    if zipfile.is_zipfile(buffer):
        try:
            with zipfile.ZipFile(buffer) as archive:
                infos = archive.infolist()
                _check_sizes(len(infos), sum(i.file_size for i in infos))
                for info in infos:
                    _check_member(info.filename)
                archive.extractall(dest)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as err:
            raise InvalidAdapterError(f"the zip archive cannot be read: {err}") from err
    else:
        buffer.seek(0)
        try:
            with tarfile.open(fileobj=buffer, mode="r:*") as archive:
                members = []
                for member in archive:  # read one by one: a count cap before the whole index
                    members.append(member)
                    _check_sizes(len(members), sum(m.size for m in members))
                for member in members:
                    _check_member(member.name)
                    if not (member.isfile() or member.isdir()):
                        raise InvalidAdapterError(f"archive member {member.name!r} is not a regular file")
                archive.extractall(dest, filter="data")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise InvalidAdapterError(f"upload is neither a zip nor a tar archive ({type(err).__name__})") from err
    if (dest / "adapter_config.json").is_file():
        return dest
    children = [c for c in dest.iterdir() if c.is_dir()]
    if len(children) == 1 and (children[0] / "adapter_config.json").is_file():
        return children[0]
    raise InvalidAdapterError("archive holds no adapter_config.json at its root or in one top-level folder")


def _check_sizes(members: int, expanded: int) -> None:
    if members > MAX_MEMBERS:
        raise InvalidAdapterError(f"the archive has more than {MAX_MEMBERS} members; an adapter folder has a few")
    if expanded > MAX_EXPANDED_BYTES:
        raise InvalidAdapterError(f"the archive unpacks to more than {MAX_EXPANDED_BYTES} bytes")


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

    async def register_archive(self, name: str, version: str, body: AsyncIterator[bytes]) -> AdapterVersion:
        """Unpack an uploaded adapter into ``<store>/name/version``, then validate and register it.

        The upload is streamed to a temporary file (in memory up to 8 MiB, then on disk),
        never held whole in memory. Nothing is left in the store when validation fails.
        """
        target = self.registry.version_path(name, version)
        if target.exists():
            raise ConflictError(f"{name}/{version} exists in the adapter store already")
        target.parent.mkdir(parents=True, exist_ok=True)
        upload = tempfile.SpooledTemporaryFile(max_size=8 * 1024**2, dir=str(target.parent))  # noqa: SIM115 (closed below)
        try:
            size = 0
            async for chunk in body:
                size += len(chunk)
                if size > MAX_ARCHIVE_BYTES:
                    raise InvalidAdapterError(f"archive is over {MAX_ARCHIVE_BYTES} bytes, the limit")
                await asyncio.to_thread(upload.write, chunk)
            return await self._register_upload(name, version, target, upload)
        finally:
            upload.close()

    async def _register_upload(self, name: str, version: str, target: Path, upload: IO[bytes]) -> AdapterVersion:
        def unpack() -> None:
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".upload-{version}-") as tmp:
                folder = unpack_archive(upload, Path(tmp))
                try:
                    folder.rename(target)  # atomic: of concurrent uploads of one version, one wins
                except OSError as err:
                    raise ConflictError(f"{name}/{version} exists in the adapter store already") from err

        await asyncio.to_thread(unpack)
        try:
            return await self.register(name, version)
        except BaseException:
            # Whatever stopped it (a refusal, a crash, a cancelled request): no half-registered
            # folder stays behind to make every retry a 409.
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
        """Forget a version that no tenant uses, and remove its files from the store."""
        await asyncio.to_thread(self.registry.delete, name, version)
        await asyncio.to_thread(shutil.rmtree, self.registry.version_path(name, version), True)
