"""Trained adapters and training checkpoints in the JetStream object store (`subjects.ADAPTER_FILES_BUCKET`),
so that a worker or a trainer on another machine (no shared disk) can fetch them.

A folder travels as one object: an uncompressed tar of its regular files (safetensors do not compress),
built deterministically (sorted names, zeroed times and owners), so its sha256 names one version of its
content. Objects:

- `adapters/<model>.<adapter>/<digest16>.tar`: a trained adapter (adapter_config.json,
  adapter_model.safetensors, tokenizer files if any), recorded in its `AdapterRecord` (`object`, `digest`);
- `checkpoints/<job>.tar`: the latest checkpoint of a running job (`step-NNNNNN/...`), replaced at every
  save and deleted when the job ends.

Tars are built and unpacked through temporary files beside their destination (never whole in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import IO

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    NotFoundError,
    ObjectDeletedError,
    ObjectNotFoundError,
)
from nats.js.object_store import ObjectStore

from schemas import subjects
from schemas.training import AdapterRecord, adapter_decoder

log = structlog.get_logger()

_MISSING = (ObjectNotFoundError, ObjectDeletedError, NotFoundError)


class Packed:
    """A folder packed into a temporary tar file (deleted by `close()`)."""

    def __init__(self, file: IO[bytes], digest: str, size: int) -> None:
        self.file = file
        self.digest = digest
        self.size = size

    def close(self) -> None:
        self.file.close()


def pack(folder: Path, *, prefix: str = "") -> Packed:
    """Tar the regular files under `folder` (names relative to it, under `prefix/` if given)."""
    file = tempfile.TemporaryFile(dir=folder.parent)
    try:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
                name = path.relative_to(folder).as_posix()
                info = tarfile.TarInfo(f"{prefix}/{name}" if prefix else name)
                info.size = path.stat().st_size
                info.mode, info.mtime = 0o644, 0
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        file.seek(0)
        digest = hashlib.sha256()
        while chunk := file.read(1 << 20):
            digest.update(chunk)
        size = file.tell()
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return Packed(file, digest.hexdigest(), size)


def unpack(file: IO[bytes], target: Path) -> None:
    """Extract a tar made by `pack` into `target` (created); links, devices and paths outside refused."""
    target.mkdir(parents=True, exist_ok=True)
    file.seek(0)
    with tarfile.open(fileobj=file, mode="r") as tar:
        tar.extractall(target, filter="data")


def _sha256(file: IO[bytes]) -> str:
    file.seek(0)
    digest = hashlib.sha256()
    while chunk := file.read(1 << 20):
        digest.update(chunk)
    file.seek(0)
    return digest.hexdigest()


async def _put(store: ObjectStore, name: str, packed: Packed) -> None:
    await store.put(name, packed.file)  # type: ignore[arg-type]


async def _get(store: ObjectStore, name: str, file: IO[bytes]) -> None:
    await store.get(name, writeinto=file)  # type: ignore[arg-type]


async def delete(store: ObjectStore, name: str) -> bool:
    """Delete object `name`; False when there was none."""
    try:
        await store.delete(name)
    except _MISSING:
        return False
    return True


# --- adapters -------------------------------------------------------------------------------------
async def upload_adapter(store: ObjectStore, model_id: str, adapter: str, folder: Path) -> tuple[str, str, int]:
    """Upload the adapter in `folder`; returns (object name, sha256 digest, size in bytes)."""
    packed = await asyncio.to_thread(pack, folder)
    try:
        name = subjects.adapter_object(model_id, adapter, packed.digest)
        await _put(store, name, packed)
    finally:
        packed.close()
    log.info("adapter_uploaded", model_id=model_id, adapter=adapter, object=name, size=packed.size)
    return name, packed.digest, packed.size


async def fetch_adapter(store: ObjectStore, name: str, digest: str, target: Path) -> Path:
    """Download object `name` and unpack it into `target` (atomically: a half-written folder never shows
    under that name). An existing `target` is reused (same digest, same content). Raises FileNotFoundError
    when the object is gone, ValueError when its content does not match `digest`."""
    if await asyncio.to_thread(target.is_dir):
        return target
    tmp = await asyncio.to_thread(_tmp_dir, target.parent, f".{target.name}.tmp-")
    try:
        with tempfile.TemporaryFile(dir=target.parent) as file:
            try:
                await _get(store, name, file)
            except _MISSING as exc:
                raise FileNotFoundError(f"object {name!r} is not in {subjects.ADAPTER_FILES_BUCKET}") from exc
            await asyncio.to_thread(_install, file, name, digest, tmp, target)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return target


def _tmp_dir(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def _install(file: IO[bytes], name: str, digest: str, tmp: Path, target: Path) -> None:
    got = _sha256(file)
    if digest and got != digest:
        raise ValueError(f"object {name!r} has sha256 {got}, its record says {digest}")
    unpack(file, tmp)
    try:
        tmp.rename(target)
    except OSError:
        if not target.is_dir():  # else: another process of this host unpacked it first
            raise


# --- checkpoints ------------------------------------------------------------------------------------
async def upload_checkpoint(store: ObjectStore, job_id: str, folder: Path) -> None:
    """Upload checkpoint `folder` (`.../checkpoints/step-NNNNNN`), replacing the job's previous one."""
    packed = await asyncio.to_thread(pack, folder, prefix=folder.name)
    try:
        await _put(store, subjects.checkpoint_object(job_id), packed)
    finally:
        packed.close()
    log.info("checkpoint_uploaded", job_id=job_id, checkpoint=folder.name, size=packed.size)


async def fetch_checkpoint(store: ObjectStore, job_id: str, checkpoints: Path) -> str | None:
    """Unpack the job's uploaded checkpoint under `checkpoints` (the folder `step-NNNNNN` it holds, kept
    if already there); returns that folder's name, or None when the job has none uploaded."""
    tmp = await asyncio.to_thread(_tmp_dir, checkpoints, ".fetch-")
    try:
        with tempfile.TemporaryFile(dir=checkpoints) as file:
            try:
                await _get(store, subjects.checkpoint_object(job_id), file)
            except _MISSING:
                return None
            found = await asyncio.to_thread(_install_checkpoint, file, tmp, checkpoints)
        if found is None:
            log.warning("checkpoint_object_malformed", job_id=job_id)
        else:
            log.info("checkpoint_fetched", job_id=job_id, checkpoint=found)
        return found
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def _install_checkpoint(file: IO[bytes], tmp: Path, checkpoints: Path) -> str | None:
    unpack(file, tmp)
    folders = [p for p in tmp.iterdir() if p.is_dir() and p.name.startswith("step-")]
    if len(folders) != 1:
        return None
    if not (checkpoints / folders[0].name).exists():
        with contextlib.suppress(OSError):
            os.replace(folders[0], checkpoints / folders[0].name)
    return folders[0].name


# --- deleting ---------------------------------------------------------------------------------------
async def delete_adapter(js: JetStreamContext, model_id: str, adapter: str) -> AdapterRecord | None:
    """Unregister a trained adapter everywhere: delete its record (every worker following the adapters
    bucket unloads it and removes its cache folder) and then its files. Returns the deleted record, None
    when there was none."""
    key = subjects.adapter_key(model_id, adapter)
    try:
        kv = await js.key_value(subjects.ADAPTERS_BUCKET)
        entry = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError, NotFoundError):
        return None
    try:
        record = adapter_decoder.decode(entry.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        record = AdapterRecord(model_id=model_id, name=adapter, path="")
    await kv.delete(key)
    if record.object:
        with contextlib.suppress(BucketNotFoundError):
            await delete(await js.object_store(subjects.ADAPTER_FILES_BUCKET), record.object)
    log.info("adapter_deleted", model_id=model_id, adapter=adapter, object=record.object)
    return record
