"""The trained adapters registered in the adapters KV bucket, as the gateway sees them (a core subscription on
the bucket's subjects plus a read at start and after a reconnect).

A job reads `completed` once its adapter is registered, and workers load it when its update reaches them (or on
the first request that names it, services/engine/adapters.py `ensure`): counting registered adapters as usable
means a client that asks right after `completed` / `succeeded` is served, not told 404 for the second or so the
workers take to announce it.
"""

from __future__ import annotations

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import subjects
from schemas.training import adapter_decoder

log = structlog.get_logger()


class RegisteredAdapters:
    def __init__(self) -> None:
        self._by_model: dict[str, set[str]] = {}

    async def start(self, nc: NATS, js: JetStreamContext) -> None:
        await nc.subscribe(subjects.kv_subjects(subjects.ADAPTERS_BUCKET), cb=self._on_update)
        await self.reload(js)

    async def reload(self, js: JetStreamContext) -> None:
        try:
            kv = await js.key_value(subjects.ADAPTERS_BUCKET)
            keys = await kv.keys()
        except Exception as exc:  # no bucket yet (no trainer ever ran) or no keys
            log.debug("registered_adapters_initial_load", note=repr(exc))
            return
        found: dict[str, set[str]] = {}
        for key in keys:
            try:
                entry = await kv.get(key)
                if entry.value:
                    record = adapter_decoder.decode(entry.value)
                    found.setdefault(record.model_id, set()).add(record.name)
            except Exception as exc:  # deleted meanwhile, or undecodable: skip it
                log.debug("registered_adapter_unreadable", key=key, error=repr(exc))
        self._by_model = found  # swapped whole: lookups meanwhile see the previous view, never an empty one

    async def _on_update(self, msg: Msg) -> None:
        key = msg.subject.removeprefix(f"$KV.{subjects.ADAPTERS_BUCKET}.")
        model_token, _, name_token = key.partition(".")
        model_id, name = subjects.untoken(model_token), subjects.untoken(name_token)
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            self._by_model.get(model_id, set()).discard(name)
        elif msg.data:
            self._by_model.setdefault(model_id, set()).add(name)

    def of(self, model_id: str) -> set[str]:
        return set(self._by_model.get(model_id, ()))
