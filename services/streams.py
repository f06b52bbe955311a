"""Create (or reconcile) the JetStream streams and KV buckets a service relies on. Idempotent."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

from schemas import subjects

# Requests older than this are dropped by the server (clients gave up long before).
REQUEST_MAX_AGE_S = 600.0
WORKERS_TTL_S = 30.0


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # "stream name already in use with a different configuration"
            raise
        await js.update_stream(config)


async def ensure_generate_stream(js: JetStreamContext, max_size: int) -> None:
    """The bounded work queue of generate requests (file storage: a restart keeps queued work)."""
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.GENERATE_STREAM,
            subjects=[subjects.GENERATE_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_msgs=max_size,
            max_age=REQUEST_MAX_AGE_S,
        ),
    )


async def ensure_bucket(
    js: JetStreamContext, bucket: str, *, ttl: float | None = None, storage: StorageType = StorageType.FILE
) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, ttl=ttl, storage=storage))


async def ensure_workers_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(js, subjects.WORKERS_BUCKET, ttl=WORKERS_TTL_S, storage=StorageType.MEMORY)
