"""Hostile adapter archives are refused with a 4xx, leaving the store and the disk as they were."""

from __future__ import annotations

import asyncio
import io
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.adapters import admin as adapter_admin
from services.adapters.admin import AdapterAdmin
from services.adapters.registry import AdapterRegistry
from services.errors import ConflictError, InvalidAdapterError, ServiceError


async def no_engine(adapter: str) -> None:
    """The engine's load check, which these archives never reach (or pass)."""


def store(tmp_path: Path, engine: Path) -> AdapterAdmin:
    return AdapterAdmin(AdapterRegistry(tmp_path / "store"), str(engine), 8, no_engine)


async def chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def tar_of(members: dict[str, bytes], **kinds: str) -> bytes:
    """A .tar.gz of files; ``kinds`` turns a name into a symlink, a hard link or a device."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            kind = kinds.get(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "device":
                info.type = tarfile.CHRTYPE
            else:
                info.size = len(content)
            archive.addfile(info, io.BytesIO(content) if kind is None else None)
    return buffer.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def folder_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def disk(tmp_path: Path) -> list[str]:
    """Everything under the store, so a refusal can be shown to leave nothing behind."""
    root = tmp_path / "store"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


HOSTILE = {
    "traversal": lambda: tar_of({"../evil.txt": b"x", "adapter_config.json": b"{}"}),
    "absolute": lambda: zip_of({"/etc/evil.txt": b"x"}),
    "symlink": lambda: tar_of({"adapter_config.json": b"{}", "link": b""}, link="symlink"),
    "device": lambda: tar_of({"adapter_config.json": b"{}", "tty": b""}, tty="device"),
    "bomb": lambda: zip_of({"adapter_config.json": b"{}", "weights.bin": b"\0" * (8 * 1024**2)}),
    "ten_thousand_members": lambda: zip_of({f"f{n}.txt": b"" for n in range(10_000)}),
    "deep_json": lambda: zip_of({"adapter_config.json": b"[" * 100_000 + b"]" * 100_000}),
    "not_an_archive": lambda: b"just some bytes",
    "no_config": lambda: zip_of({"README.md": b"hello"}),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_a_hostile_archive_is_refused_and_leaves_nothing(
    kind: str, tmp_path: Path, tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bomb: 8 MiB of zeros compress to a few KB; with the cap at 1 MiB it is what a 64 GiB one is.
    monkeypatch.setattr(adapter_admin, "MAX_EXPANDED_BYTES", 1024**2)
    admin = store(tmp_path, tiny_llm_dir)
    before = disk(tmp_path)
    with pytest.raises(ServiceError) as refused:
        await admin.register_archive("voice", "v1", chunks(HOSTILE[kind]()))
    assert 400 <= refused.value.status_code < 500, refused.value.message
    assert admin.registry.state().adapters == {}
    assert disk(tmp_path) in (before, ["voice"])  # at most the empty folder of the adapter's name
    assert not (tmp_path / "evil.txt").exists() and not Path("/etc/evil.txt").exists()


async def test_of_eight_concurrent_uploads_of_one_version_exactly_one_wins(
    tmp_path: Path, tiny_llm_dir: Path, adapters_dir: Path
) -> None:
    admin = store(tmp_path, tiny_llm_dir)
    upload = zip_of(folder_of(adapters_dir / "brand-a"))
    results = await asyncio.gather(
        *(admin.register_archive("voice", "v1", chunks(upload)) for _ in range(8)), return_exceptions=True
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and all(isinstance(e, ConflictError) for e in lost), results
    assert list(admin.registry.state().adapters["voice"]) == ["v1"]
    assert (admin.registry.version_path("voice", "v1") / "adapter_config.json").is_file()


async def test_an_archive_over_the_upload_limit_is_refused_while_it_streams(
    tmp_path: Path, tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapter_admin, "MAX_ARCHIVE_BYTES", 100_000)
    admin = store(tmp_path, tiny_llm_dir)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 65536
            yield b"\0" * 65536

    with pytest.raises(InvalidAdapterError, match="over 100000 bytes"):
        await admin.register_archive("voice", "v1", endless())
    assert sent < 200_000  # stopped as soon as it passed the limit


async def test_deleting_a_version_removes_its_files(tmp_path: Path, tiny_llm_dir: Path, adapters_dir: Path) -> None:
    admin = store(tmp_path, tiny_llm_dir)
    await admin.register_archive("voice", "v1", chunks(zip_of(folder_of(adapters_dir / "brand-a"))))
    assert admin.registry.version_path("voice", "v1").is_dir()
    await admin.delete("voice", "v1")
    assert not admin.registry.version_path("voice", "v1").exists()


def test_the_deep_json_is_refused_as_invalid_not_as_a_crash(tmp_path: Path, tiny_llm_dir: Path) -> None:
    from services.adapters.validation import validate_adapter_folder

    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidAdapterError, match="nested too deeply"):
        validate_adapter_folder(tmp_path, engine_model=str(tiny_llm_dir), max_rank=8)
