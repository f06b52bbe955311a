"""Stored /v1/responses responses in the JetStream KV bucket `subjects.RESPONSES_BUCKET` (schemas/responses.py).

The bucket is created on first use (file storage, replicated by `CY_LLM_JS_REPLICAS`, records dropped
`CY_LLM_RESPONSES_TTL` seconds after they were written). Every method raises CyError, never a NATS error: an
unknown id is a 404 in OpenAI's shape, an unreachable store a retryable 503.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode, ErrorDetail
from schemas.responses import StoredResponse, response_decoder
from services import jetstream

log = structlog.get_logger()

_ID = re.compile(r"^resp_[0-9a-f]{32}$")
# Room left in a NATS message for the record's answer, per token it may generate (a token's text is a few
# bytes; this is generous), plus headers.
_BYTES_PER_TOKEN = 64
_HEADROOM = 4096


class ResponseNotFound(CyError):
    """No stored response with that id (never stored, `store: false`, deleted or expired): 404 with OpenAI's
    `invalid_request_error`, `param` naming the parameter that held the id."""

    def __init__(self, response_id: str, param: str) -> None:
        what = "Previous response" if param == "previous_response_id" else "Response"
        super().__init__(
            ErrorCode.INVALID_REQUEST,
            f"{what} with id '{response_id}' not found.",
            details=[
                ErrorDetail(
                    type="previous_response_not_found" if param == "previous_response_id" else "not_found",
                    field=param,
                )
            ],
        )

    @property
    def status(self) -> int:
        return 404


def _unavailable(exc: Exception) -> CyError:
    log.warning("response_store_unavailable", error=repr(exc))
    return CyError(
        ErrorCode.INSUFFICIENT_RESOURCES,
        "the response store is unavailable, try again",
        retryable=True,
        retry_after=2,
    )


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class ResponseStore:
    """`nc` gives the gateway's NATS connection (made once the gateway has started)."""

    def __init__(self, nc: Callable[[], NATS], ttl: float) -> None:
        self._nc = nc
        self._ttl = ttl
        self._kv: KeyValue | None = None
        self._ready = asyncio.Lock()

    async def _bucket(self, *, again: bool = False) -> KeyValue:
        if self._kv is None or again:
            async with self._ready:
                if self._kv is None or again:
                    self._kv = await jetstream.ensure_responses_bucket(self._nc().jetstream(), self._ttl)
        return self._kv

    def check_size(self, record: StoredResponse, max_new_tokens: int) -> None:
        """Refuse, before generating, a conversation whose record could not be stored once answered (a NATS
        message holds at most the server's max_payload: 8 MB in infra/nats.py's config, 1 MiB in nats-server's
        own). Raises CyError(INVALID_REQUEST)."""
        size = len(codec.encode(record)) + max_new_tokens * _BYTES_PER_TOKEN + _HEADROOM
        limit = int(self._nc().max_payload or 0)
        if limit and size > limit:
            raise CyError(
                ErrorCode.INVALID_REQUEST,
                f"The conversation is too long to store (about {size} bytes with its answer; the limit is {limit}). "
                "Start a new conversation, or send 'store': false with the whole conversation as 'input'.",
                details=[ErrorDetail(type="conversation_too_large", field="input")],
            )

    async def get(self, response_id: str, param: str) -> StoredResponse:
        """Raises ResponseNotFound naming `param`, CyError(INSUFFICIENT_RESOURCES) when NATS fails."""
        if not _ID.match(response_id):
            raise ResponseNotFound(response_id, param)
        try:
            kv = await self._bucket()
            entry = await kv.get(subjects.response_key(response_id))
        except NotFoundError:  # the key (KeyNotFoundError, deleted included), or the bucket's stream gone
            raise ResponseNotFound(response_id, param) from None
        except (NatsError, TimeoutError) as exc:
            raise _unavailable(exc) from None
        if not entry.value:
            raise ResponseNotFound(response_id, param)
        try:
            return response_decoder.decode(entry.value)
        except msgspec.DecodeError:
            log.exception("stored_response_unreadable", response_id=response_id)
            raise ResponseNotFound(response_id, param) from None

    async def put(self, record: StoredResponse) -> None:
        """Raises CyError(INSUFFICIENT_RESOURCES) when NATS fails (the bucket is re-created once when its stream
        is gone: a server that came back without its store)."""
        data = codec.encode(record)
        key = subjects.response_key(record.id)
        try:
            try:
                await (await self._bucket()).put(key, data)
            except (NotFoundError, NoStreamResponseError):  # no stream answers the publish: re-create it
                await (await self._bucket(again=True)).put(key, data)
        except (NatsError, TimeoutError) as exc:
            raise _unavailable(exc) from None

    async def delete(self, response_id: str) -> None:
        """Raises ResponseNotFound, CyError(INSUFFICIENT_RESOURCES) when NATS fails."""
        await self.get(response_id, "response_id")
        try:
            kv = await self._bucket()
            # Purge: the record's data is removed from the stream, not only hidden behind a delete marker.
            await kv.purge(subjects.response_key(response_id))
        except KeyNotFoundError:
            raise ResponseNotFound(response_id, "response_id") from None
        except (NatsError, TimeoutError) as exc:
            raise _unavailable(exc) from None
