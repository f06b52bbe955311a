"""The trained adapters registered in the adapters KV bucket, as the gateway sees them (a core subscription on
the bucket's subjects plus a read at start and after a reconnect).

A job reads `completed` once its adapter is registered, and workers load it when its update reaches them (or on
the first request that names it, services/engine/adapters.py `ensure`): counting registered adapters as usable
means a client that asks right after `completed` / `succeeded` is served, not told 404 for the second or so the
workers take to announce it.
"""

from __future__ import annotations

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas import subjects
from schemas.training import adapter_decoder
from services import kv_scan

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
            entries = await kv_scan.entries(js, kv, subjects.ADAPTERS_BUCKET)
        except NotFoundError:  # no bucket yet: no trainer ever ran
            return
        except NatsError as exc:  # keep the previous view; the live updates still arrive
            log.warning("registered_adapters_reload_failed", error=repr(exc))
            return
        found: dict[str, set[str]] = {}
        for key, value in entries.items():
            try:
                record = adapter_decoder.decode(value)
                found.setdefault(record.model_id, set()).add(record.name)
            except msgspec.DecodeError as exc:
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
