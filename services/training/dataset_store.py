"""Training datasets kept in a JetStream object store (`subjects.DATASETS_BUCKET`), so that the gateway that
receives an upload and the trainer that trains on it share no disk.

An upload is validated row by row (services/training/datasets.py, the same messages as a `datasetPath`), then
stored under its id (`ds-<hex>`, also the object name) with its metadata in the object's headers; the object
store computes its SHA-256 digest. A trainer copies a dataset into its own folder under `<id>-<digest>.<fmt>`
(`fetch`), so a copy is never stale and is fetched once per trainer.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Literal

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMeta
from nats.js.errors import DigestMismatchError, NotFoundError
from nats.js.object_store import ObjectStore

from schemas.errors import CyError, ErrorCode, ErrorDetail, invalid
from services import jetstream
from services.training import datasets

DatasetFormat = Literal["jsonl", "json"]
FORMATS: tuple[DatasetFormat, ...] = ("jsonl", "json")
_ID = re.compile(r"^ds-[0-9a-f]{24}$")
_NAME_MAX = 255
# Object headers holding the metadata (values are lists of strings, as in the Go client).
_H_NAME, _H_FORMAT, _H_ROWS, _H_CREATED = "Cy-Name", "Cy-Format", "Cy-Rows", "Cy-Created-Ms"


class DatasetInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What is known about a stored dataset. `digest` is the object store's (`SHA-256=<base64url>`)."""

    dataset_id: str
    name: str
    format: DatasetFormat
    rows: int
    bytes: int
    digest: str
    created_ms: int


def not_found(dataset_id: str, field: str = "id") -> CyError:
    return CyError(
        ErrorCode.DATASET_NOT_FOUND,
        f"Dataset '{dataset_id}' does not exist",
        details=[ErrorDetail(type="dataset_not_found", field=field, description=f"no dataset with id '{dataset_id}'")],
    )


def detect_format(name: str, data: bytes) -> DatasetFormat:
    """From the file name's extension; without one, a body starting with `[` is JSON, anything else JSONL."""
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix  # type: ignore[return-value]
    return "json" if data.lstrip()[:1] == b"[" else "jsonl"


def clean_name(name: str) -> str:
    """The file name as given, without any folder part (it is a label, never a path)."""
    base = PurePosixPath(name.replace("\\", "/")).name.replace("\x00", "")
    return base[:_NAME_MAX]


def validate(data: bytes, fmt: DatasetFormat, param: str) -> int:
    """Rows of a dataset in memory. Raises CyError(INVALID_REQUEST) with the row and field of the first
    problem, in the words a `datasetPath` gets, the detail's `field` naming `param` (`file[row 3].output`)."""
    try:
        return len(datasets.parse(data, fmt))
    except datasets.DatasetError as exc:
        detail = exc.body.details[0]
        field = f"{param}[row {exc.row}].{exc.field}" if exc.row and exc.field else param
        message = exc.body.message.replace("Invalid datasetPath:", "Invalid dataset:", 1)
        raise CyError(
            ErrorCode.INVALID_REQUEST,
            message,
            details=[ErrorDetail(type=detail.type, field=field, description=detail.description)],
        ) from None


def digest_hex(digest: str) -> str:
    """`SHA-256=<base64url>` -> hex (for file names)."""
    raw = digest.split("=", 1)[1] if "=" in digest else digest
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()


def _info(obj: ObjectInfo) -> DatasetInfo | None:
    """None for a deleted object or one this module did not write."""
    headers = obj.headers or {}
    if obj.deleted or _H_FORMAT not in headers:
        return None

    def first(key: str) -> str:
        value = headers.get(key) or [""]
        return str(value[0] if isinstance(value, list) else value)

    return DatasetInfo(
        dataset_id=obj.name,
        name=first(_H_NAME),
        format=first(_H_FORMAT) if first(_H_FORMAT) in FORMATS else "jsonl",  # type: ignore[arg-type]
        rows=int(first(_H_ROWS) or 0),
        bytes=int(obj.size or 0),
        digest=obj.digest or "",
        created_ms=int(first(_H_CREATED) or 0),
    )


class DatasetStore:
    """The datasets bucket (created on first use). Every method raises CyError, never a NATS error."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._store: ObjectStore | None = None
        self._ready = asyncio.Lock()

    async def store(self) -> ObjectStore:
        if self._store is None:
            async with self._ready:
                if self._store is None:
                    self._store = await jetstream.ensure_datasets_store(self.js)
        return self._store

    async def put(self, data: bytes, name: str, *, param: str = "file") -> DatasetInfo:
        """Validate and store a dataset. Raises CyError(INVALID_REQUEST) naming the row and field."""
        name = clean_name(name)
        fmt = detect_format(name, data)
        rows = await asyncio.to_thread(validate, data, fmt, param)
        dataset_id = f"ds-{uuid.uuid4().hex[:24]}"
        created_ms = int(time.time() * 1000)
        headers = {
            _H_NAME: [name or f"{dataset_id}.{fmt}"],
            _H_FORMAT: [fmt],
            _H_ROWS: [str(rows)],
            _H_CREATED: [str(created_ms)],
        }
        store = await self.store()
        obj = await store.put(dataset_id, data, meta=ObjectMeta(name=dataset_id, headers=headers))
        info = _info(obj)
        assert info is not None
        return info

    async def info(self, dataset_id: str, *, field: str = "id") -> DatasetInfo:
        """Raises CyError(DATASET_NOT_FOUND) naming `field`."""
        if not _ID.match(dataset_id):
            raise not_found(dataset_id, field)
        store = await self.store()
        try:
            info = _info(await store.get_info(dataset_id))
        except NotFoundError:
            info = None
        if info is None:
            raise not_found(dataset_id, field)
        return info

    async def list(self) -> list[DatasetInfo]:
        """Every dataset, newest first."""
        store = await self.store()
        try:
            objects = await store.list(ignore_deletes=True)
        except NotFoundError:  # an empty bucket
            return []
        found = [info for obj in objects if (info := _info(obj)) is not None]
        found.sort(key=lambda d: (d.created_ms, d.dataset_id), reverse=True)
        return found

    async def read(self, dataset_id: str, *, field: str = "id") -> tuple[DatasetInfo, bytes]:
        """The dataset's bytes (checked against its digest). Raises CyError(DATASET_NOT_FOUND)."""
        info = await self.info(dataset_id, field=field)
        store = await self.store()
        try:
            result = await store.get(dataset_id)
        except NotFoundError:
            raise not_found(dataset_id, field) from None
        except DigestMismatchError:
            raise CyError(ErrorCode.INTERNAL_ERROR, f"dataset '{dataset_id}' is damaged (digest mismatch)") from None
        return info, bytes(result.data or b"")

    async def delete(self, dataset_id: str, *, field: str = "id") -> DatasetInfo:
        """Raises CyError(DATASET_NOT_FOUND). Checks no job: the routes delete through `holders.delete_dataset`,
        which refuses while a queued, running or paused job trains from it."""
        info = await self.info(dataset_id, field=field)
        store = await self.store()
        try:
            await store.delete(dataset_id)
        except NotFoundError:
            raise not_found(dataset_id, field) from None
        return info

    async def fetch(self, dataset_id: str, digest: str, folder: Path) -> Path:
        """A local copy of the dataset as it was when the job was started (same digest), under `folder`.

        Raises CyError(INVALID_REQUEST) when the dataset was deleted or replaced since.
        """
        info = await self.info(dataset_id, field="datasetId")
        if digest and info.digest != digest:
            raise invalid("datasetId", f"dataset '{dataset_id}' changed since the job was started")
        path = folder / f"{dataset_id}-{digest_hex(info.digest)[:32]}.{info.format}"
        if await asyncio.to_thread(path.is_file):
            return path
        _, data = await self.read(dataset_id, field="datasetId")
        await asyncio.to_thread(_save, path, data)
        return path


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a crash never leaves a half-written copy under the final name
