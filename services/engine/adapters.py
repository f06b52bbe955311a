"""LoRA adapters on an engine worker: the registry's static ones and the trained ones registered in the
adapters KV bucket (`subjects.ADAPTERS_BUCKET`, key `subjects.adapter_key(model_id, name)`).

`AdapterSync` loads every adapter of the worker's model when the worker starts, then watches the bucket
and loads (or replaces, or drops) adapters as they are registered, so a freshly trained adapter becomes
usable by name without a restart. Engines implement `register_adapter(name, path)` (and optionally
`unregister_adapter(name)`); `attach` below is the transformers/peft implementation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext

from schemas import subjects
from schemas.errors import CyError, ErrorCode
from schemas.training import adapter_decoder
from services import streams

log = structlog.get_logger()

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
                model.delete_adapter(name)
            model.load_adapter(path, adapter_name=name, is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise CyError(ErrorCode.INVALID_REQUEST, f"adapter {name!r} at {path} cannot be loaded: {exc}") from exc
    return model.eval()


def detach(model: Any, name: str, _path: str = "") -> Any:
    """Drop adapter `name` and return the model to run (call with `model_lock` held)."""
    if name in getattr(model, "peft_config", {}):
        model.delete_adapter(name)
    return model


# --- the worker side ----------------------------------------------------------------------------
class AdapterSync:
    """Keeps `engine`'s adapters in step with the registry and the adapters bucket for `model_id`."""

    def __init__(
        self,
        js: JetStreamContext,
        engine: Any,
        model_id: str,
        static: dict[str, str],
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        self.js = js
        self.engine = engine
        self.model_id = model_id
        self.static = static
        self.on_change = on_change
        self._watcher: Any = None
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
        kv = await streams.ensure_adapters_bucket(self.js)
        self._watcher = await kv.watch(subjects.adapters_of_model(self.model_id))
        while (entry := await self._watcher.updates(timeout=30)) is not None:
            await self._apply(entry)
            if entry.delta == 0:
                break
        self._task = asyncio.create_task(self._follow(), name="adapters")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception:
                pass

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is None:
                continue
            if await self._apply(entry):
                try:
                    await self.on_change()
                except Exception as exc:
                    log.warning("adapters_announce_failed", error=repr(exc))

    async def _apply(self, entry: Any) -> bool:
        """One bucket entry -> load or drop; True when the engine's adapters changed."""
        name = subjects.untoken(entry.key.split(".", 1)[1])
        if entry.operation in ("DEL", "PURGE"):
            unregister = getattr(self.engine, "unregister_adapter", None)
            if unregister is None or name in self.static:
                return False
            await unregister(name)
            log.info("adapter_dropped", model_id=self.model_id, adapter=name)
            return True
        try:
            record = adapter_decoder.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("adapter_record_undecodable", key=entry.key, error=repr(exc))
            return False
        return await self._load(record.name, record.path)

    async def _load(self, name: str, path: str) -> bool:
        try:
            await self.engine.register_adapter(name, path)
        except CyError as exc:
            log.error("adapter_load_failed", model_id=self.model_id, adapter=name, path=path, error=exc.body.message)
            return False
        except Exception as exc:  # a bad adapter never takes the worker down
            log.exception("adapter_load_failed", model_id=self.model_id, adapter=name, path=path, error=repr(exc))
            return False
        log.info("adapter_loaded", model_id=self.model_id, adapter=name, path=path)
        return True
