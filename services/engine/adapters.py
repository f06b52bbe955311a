"""LoRA adapters on an engine worker: the registry's static ones and the trained ones registered in the
adapters KV bucket (`subjects.ADAPTERS_BUCKET`, key `subjects.adapter_key(model_id, name)`).

`AdapterSync` loads every adapter of the worker's model when the worker starts, then follows the bucket
and loads (or replaces, or drops) adapters as they are registered, so a freshly trained adapter becomes
usable by name without a restart. A trained adapter's files come from the object store
(`subjects.ADAPTER_FILES_BUCKET`, the record's `object` and `digest`) into a cache folder of this worker,
`<data dir>/adapter-cache/<model>.<adapter>-<digest16>` (removed when the adapter is deleted or replaced),
so workers need no disk shared with the trainer; static registry adapters and records without an object
load from their `path`. Engines implement `register_adapter(name, path)` (and optionally
`unregister_adapter(name)`); `attach` below is the transformers/peft implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError
from nats.js.object_store import ObjectStore

from schemas import subjects
from schemas.errors import CyError, ErrorCode
from schemas.training import AdapterRecord, adapter_decoder
from services import adapter_store, kv_scan
from services.runtime import data_dir

log = structlog.get_logger()

# Seconds between full re-reads of the adapters bucket (catches changes missed while disconnected).
RESYNC_S = 30.0

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


# --- transformers / peft ------------------------------------------------------------------------
def attach(model: Any, name: str, path: str) -> Any:
    """Add LoRA adapter `name` from `path` to `model` (replacing one of the same name) and return the
    model to run: the base is wrapped in a PeftModel on first use, and keeps serving base requests
    (rows with adapter "__base__"). Call with the batcher's `model_lock` held.

    Raises CyError(INVALID_REQUEST) when `path` holds no usable adapter for this model.
    """
    from peft import PeftModel

    if not (Path(path) / "adapter_config.json").exists():
        raise CyError(ErrorCode.INVALID_REQUEST, f"no LoRA adapter at {path} (adapter_config.json is missing)")
    try:
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
        else:
            if name in model.peft_config:
                # Load the replacement beside the old one first: broken files leave the old adapter serving.
                probe = f"{name}__replacement"
                model.load_adapter(path, adapter_name=probe, is_trainable=False)
                model.delete_adapter(probe)
                model.delete_adapter(name)
            model.load_adapter(path, adapter_name=name, is_trainable=False)
    except Exception as exc:  # corrupt files raise whatever their reader raises (safetensors: SafetensorError)
        raise CyError(ErrorCode.INVALID_REQUEST, f"adapter {name!r} at {path} cannot be loaded: {exc}") from exc
    return model.eval()


def detach(model: Any, name: str, _path: str = "") -> Any:
    """Drop adapter `name` and return the model to run (call with `model_lock` held)."""
    config = getattr(model, "peft_config", {})
    if name in config:
        if len(config) == 1:  # the last one: back to the plain base model (a PeftModel cannot have none)
            return model.unload()
        model.delete_adapter(name)
    return model


# --- the worker side ----------------------------------------------------------------------------
class AdapterSync:
    """Keeps `engine`'s adapters in step with the registry and the adapters bucket for `model_id`.

    Live changes arrive on a plain core-NATS subscription to the bucket's subjects (no JetStream consumer
    per worker: nothing to re-create when a cluster node dies); a full re-read at start and every
    `resync_s` catches whatever was missed while disconnected.
    """

    def __init__(
        self,
        nc: NATS,
        engine: Any,
        model_id: str,
        static: dict[str, str],
        on_change: Callable[[], Awaitable[None]],
        *,
        resync_s: float = RESYNC_S,
        cache_dir: Path | None = None,
    ) -> None:
        self.nc = nc
        self.engine = engine
        self.model_id = model_id
        self.static = static
        self.on_change = on_change
        self.resync_s = resync_s
        self._loaded: dict[str, tuple[str, int]] = {}  # trained adapters: name -> (path, created_ms)
        # Where fetched adapters are unpacked; name -> the cache folder its engine copy came from.
        self.cache_dir = cache_dir if cache_dir is not None else data_dir() / "adapter-cache"
        self._cached: dict[str, Path] = {}
        self._store: ObjectStore | None = None
        self._lock = asyncio.Lock()
        self._per_name: dict[str, asyncio.Lock] = {}  # one load or drop of a name at a time
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def supported(self) -> bool:
        return callable(getattr(self.engine, "register_adapter", None))

    async def start(self) -> None:
        """Load the static adapters and those already registered, then follow the bucket."""
        if not self.supported:
            log.warning("adapters_unsupported", engine=getattr(self.engine, "name", "?"), model_id=self.model_id)
            return
        for name, path in self.static.items():
            await self._load(name, path)
        # The bucket is the trainer's to create; until it exists there is simply nothing to load.
        self._sub = await self.nc.subscribe(subjects.adapters_updates(self.model_id), cb=self._on_update)
        try:
            await self.resync()
        except Exception as exc:  # JetStream unavailable right now: serve without them, retry soon
            log.warning("adapters_resync_failed", error=repr(exc))
        self._task = asyncio.create_task(self._resync_loop(), name="adapters-resync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def resync(self) -> bool:
        """Load what is registered and not loaded (or changed), drop what was deleted. True on change."""
        js = self.nc.jetstream()
        try:
            kv = await js.key_value(subjects.ADAPTERS_BUCKET)
            # The stream's index lists the keys without creating a consumer (kv.keys() would, on every resync).
            entries = await kv_scan.entries(js, kv, subjects.ADAPTERS_BUCKET, subjects.adapters_of_model(self.model_id))
        except NotFoundError:
            entries = {}
        changed = False
        present: set[str] = set()
        for key, value in entries.items():
            record = _decode(key, value)
            if record is not None:
                present.add(record.name)
                changed |= await self._apply(record)
        for name in set(self._loaded) - present:
            changed |= await self._drop(name)
        await asyncio.to_thread(self._prune_cache)
        return changed

    def cache_folder(self, record: AdapterRecord) -> Path:
        return self.cache_dir / f"{subjects.adapter_key(self.model_id, record.name)}-{record.digest[:16]}"

    def _prune_cache(self) -> None:
        """Remove this model's cache folders that no loaded adapter uses (deleted while this worker was away)."""
        prefix = f"{subjects.token(self.model_id)}."
        in_use = set(self._cached.values())
        if not self.cache_dir.is_dir():
            return
        for path in self.cache_dir.iterdir():
            if path.name.startswith(prefix) and path not in in_use:
                shutil.rmtree(path, ignore_errors=True)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_s)
            try:
                if await self.resync():
                    await self.on_change()
            except Exception as exc:  # disconnected or a cluster election: try again next round
                log.warning("adapters_resync_failed", error=repr(exc))

    async def _on_update(self, msg: Msg) -> None:
        key = msg.subject.removeprefix(f"$KV.{subjects.ADAPTERS_BUCKET}.")
        op = (msg.headers or {}).get("KV-Operation")
        try:
            if op in ("DEL", "PURGE"):
                changed = await self._drop(subjects.untoken(key.split(".", 1)[1]))
            else:
                record = _decode(key, msg.data)
                changed = record is not None and await self._apply(record)
        except Exception:  # the next resync tries again
            log.exception("adapter_update_failed", key=key, op=op)
            return
        if changed:
            try:
                await self.on_change()
            except Exception as exc:
                log.warning("adapters_announce_failed", error=repr(exc))

    async def ensure(self, name: str) -> bool:
        """Whether adapter `name` is loaded here, loading it now if it is registered for this model but its
        update has not reached this worker yet: a job reads `completed` once its adapter is registered, and a
        request may come right then (at worst it waits for the fetch and the load, ~0.2 s for a small one)."""
        if self.engine.has_adapter(name):
            return True
        if not self.supported:
            return False
        try:
            kv = await self.nc.jetstream().key_value(subjects.ADAPTERS_BUCKET)
            key = subjects.adapter_key(self.model_id, name)
            record = _decode(key, (await kv.get(key)).value)
        except (KeyNotFoundError, KeyDeletedError, NotFoundError):
            return False
        if record is None:
            return False
        if await self._apply(record):
            with contextlib.suppress(Exception):
                await self.on_change()
        return bool(self.engine.has_adapter(name))

    def by_path(self, value: str, outputs_root: Path) -> str | None:
        """The name of the loaded adapter at `value` (the spec calls `adapter` a path): its folder, or the
        training job's outputDir that holds it; relative paths are read against `outputs_root`. Only
        adapters already loaded can match, so a path never makes the worker load files on request."""
        try:
            wanted = (outputs_root / Path(value).expanduser()).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        paths = {**self.static, **{name: path for name, (path, _) in self._loaded.items()}}
        for name, path in paths.items():
            where = Path(path).resolve()
            if wanted in (where, where.parent) and self.engine.has_adapter(name):
                return name
        return None

    async def _apply(self, record: AdapterRecord) -> bool:
        async with self._per_name.setdefault(record.name, asyncio.Lock()):
            return await self._apply_locked(record)

    async def _apply_locked(self, record: AdapterRecord) -> bool:
        if self._loaded.get(record.name) == (record.path, record.created_ms):
            return False
        folder = await self._fetch(record) if record.object else None
        if await self._load(record.name, str(folder) if folder is not None else record.path):
            self._loaded[record.name] = (record.path, record.created_ms)
            self._forget_cache(record.name, keep=folder)
            if folder is not None:
                self._cached[record.name] = folder
            return True
        return False

    async def _fetch(self, record: AdapterRecord) -> Path | None:
        """The record's files in this worker's cache (downloaded if not there yet); None when they cannot be
        fetched (then its `path` is tried: it works where the trainer's disk is shared)."""
        try:
            if self._store is None:
                self._store = await self.nc.jetstream().object_store(subjects.ADAPTER_FILES_BUCKET)
            return await adapter_store.fetch_adapter(
                self._store, record.object, record.digest, self.cache_folder(record)
            )
        except Exception as exc:
            log.error(
                "adapter_fetch_failed",
                model_id=self.model_id,
                adapter=record.name,
                object=record.object,
                error=repr(exc),
            )
            return None

    def _forget_cache(self, name: str, keep: Path | None = None) -> None:
        old = self._cached.pop(name, None)
        if old is not None and old != keep:
            shutil.rmtree(old, ignore_errors=True)

    async def _drop(self, name: str) -> bool:
        async with self._per_name.setdefault(name, asyncio.Lock()):
            return await self._drop_locked(name)

    async def _drop_locked(self, name: str) -> bool:
        unregister = getattr(self.engine, "unregister_adapter", None)
        if name not in self._loaded or name in self.static or unregister is None:
            return False
        async with self._lock:
            await unregister(name)
        del self._loaded[name]
        self._forget_cache(name)
        log.info("adapter_dropped", model_id=self.model_id, adapter=name)
        return True

    async def _load(self, name: str, path: str) -> bool:
        try:
            async with self._lock:
                await self.engine.register_adapter(name, path)
        except CyError as exc:
            log.error("adapter_load_failed", model_id=self.model_id, adapter=name, path=path, error=exc.body.message)
            return False
        except Exception as exc:  # a bad adapter never takes the worker down
            log.exception("adapter_load_failed", model_id=self.model_id, adapter=name, path=path, error=repr(exc))
            return False
        log.info("adapter_loaded", model_id=self.model_id, adapter=name, path=path)
        return True


def _decode(key: str, data: bytes | None) -> AdapterRecord | None:
    try:
        return adapter_decoder.decode(data or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("adapter_record_undecodable", key=key, error=repr(exc))
        return None
