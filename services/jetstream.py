"""JetStream setup: create (or reconcile) the streams, KV buckets and object stores a service relies on. Idempotent."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from nats.errors import ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError, ServerError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from schemas import subjects
from services.runtime import SettingsError

T = TypeVar("T")
log = structlog.get_logger("streams")

# How long a service keeps retrying stream/bucket/consumer setup while JetStream is unavailable (a
# cluster electing a new meta leader after a node died, a server still starting up).
ADMIN_RETRY_S = 60.0
_TRANSIENT = (
    NatsTimeoutError,
    NoRespondersError,
    ConnectionReconnectingError,
    ServiceUnavailableError,
    ServerError,
)

# Requests older than this are dropped by the server (clients gave up long before).
REQUEST_MAX_AGE_S = 600.0
WORKERS_TTL_S = 30.0


def replicas() -> int:
    """JetStream replication factor for everything created here: `CY_LLM_JS_REPLICAS` (default 1; 3 on the
    3-node cluster). Read here rather than per service because every service must agree on it."""
    value = os.environ.get("CY_LLM_JS_REPLICAS", "1")
    if value not in {"1", "2", "3", "4", "5"}:
        raise SettingsError(f"Config error in CY_LLM_JS_REPLICAS: expected 1-5, got {value!r}")
    return int(value)


async def admin(op: Callable[[], Awaitable[T]], what: str, deadline_s: float = ADMIN_RETRY_S) -> T:
    """Run a JetStream admin call, retrying while JetStream is temporarily unavailable (timeouts, no
    responders, 503/500 answers: what a cluster returns during a leader election). Other errors, and the
    last transient one after `deadline_s`, propagate."""
    give_up = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            return await op()
        except _TRANSIENT as exc:
            if time.monotonic() + delay > give_up:
                raise
            log.warning("jetstream_unavailable_retrying", what=what, error=repr(exc), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    config.num_replicas = replicas()
    await admin(lambda: _ensure_stream(js, config), f"stream {config.name}")


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # "stream name already in use with a different configuration"
            raise
        await js.update_stream(config)


def _work_queue(name: str, subject: str, max_size: int, **limits: object) -> StreamConfig:
    """A bounded work queue of generate requests (file storage: a restart keeps queued work; full: refused)."""
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_msgs=max_size,
        max_age=REQUEST_MAX_AGE_S,
        **limits,  # type: ignore[arg-type]
    )


async def ensure_generate_stream(js: JetStreamContext, max_size: int) -> None:
    """The services' work queue (the gateway's requests)."""
    await ensure_stream(js, _work_queue(subjects.GENERATE_STREAM, subjects.GENERATE_SUBJECTS, max_size))


# Direct publishers' requests: at most this many pending per publisher, model and tier by default.
PUBLISHER_MAX_PENDING = 64


async def ensure_published_stream(js: JetStreamContext, max_size: int, max_pending: int) -> None:
    """Direct publishers' work queue (schemas/subjects.py PUBLISHED_STREAM): `max_pending` per subject (one
    publisher, model and tier; the excess is refused to that publisher at publish time), `max_size` in all."""
    config = _work_queue(
        subjects.PUBLISHED_STREAM,
        subjects.PUBLISHED_SUBJECTS,
        max_size,
        discard_new_per_subject=True,
        max_msgs_per_subject=max_pending,
    )
    await ensure_stream(js, config)


async def ensure_request_streams(js: JetStreamContext, max_size: int, max_pending: int) -> None:
    """Both work queues: the services' (HTTP requests) and the direct publishers', each bounded apart."""
    await ensure_generate_stream(js, max_size)
    await ensure_published_stream(js, max_size, max_pending)


async def ensure_bucket(
    js: JetStreamContext, bucket: str, *, ttl: float | None = None, storage: StorageType = StorageType.FILE
) -> KeyValue:
    return await admin(lambda: _ensure_bucket(js, bucket, ttl, storage), f"bucket {bucket}")


async def _ensure_bucket(js: JetStreamContext, bucket: str, ttl: float | None, storage: StorageType) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except (NotFoundError, BadRequestError):
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, ttl=ttl, storage=storage, replicas=replicas())
        )


async def ensure_workers_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(js, subjects.WORKERS_BUCKET, ttl=WORKERS_TTL_S, storage=StorageType.MEMORY)


# --- training -------------------------------------------------------------------------------------
TRAINING_QUEUE_MAX = 10_000
# Progress events are the loss curves users replay; keep them a month, and at most this many per job.
TRAINING_EVENTS_MAX_AGE_S = 30 * 24 * 3600.0
TRAINING_EVENTS_PER_JOB = 100_000


async def ensure_training(js: JetStreamContext) -> tuple[KeyValue, KeyValue]:
    """The jobs and adapters buckets, the job queue and the events stream. Returns (jobs, adapters)."""
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.TRAINING_QUEUE_STREAM,
            subjects=[subjects.TRAINING_QUEUE_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_msgs=TRAINING_QUEUE_MAX,
        ),
    )
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.TRAINING_EVENTS_STREAM,
            subjects=[subjects.TRAINING_EVENTS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=TRAINING_EVENTS_MAX_AGE_S,
            max_msgs_per_subject=TRAINING_EVENTS_PER_JOB,
        ),
    )
    jobs = await ensure_bucket(js, subjects.TRAINING_JOBS_BUCKET)
    return jobs, await ensure_adapters_bucket(js)


async def ensure_training_after_reconnect(js: JetStreamContext) -> None:
    """Everything training uses, the claims bucket included: run after a reconnect, since the server may
    have come back without its store (the claims bucket is otherwise created only where a start needs it)."""
    await ensure_training(js)
    await ensure_bucket(js, subjects.TRAINING_CLAIMS_BUCKET)
    await ensure_datasets_store(js)


async def ensure_datasets_store(js: JetStreamContext) -> ObjectStore:
    """The object store of uploaded datasets (file storage: datasets outlive restarts)."""
    return await admin(lambda: _ensure_object_store(js, subjects.DATASETS_BUCKET), "object store datasets")


async def _ensure_object_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    from nats.js.api import ObjectStoreConfig

    try:
        return await js.object_store(bucket)
    except NotFoundError:  # BucketNotFoundError is one
        config = ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas())
        return await js.create_object_store(bucket, config)


async def ensure_adapters_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(js, subjects.ADAPTERS_BUCKET)


async def ensure_adapter_files(js: JetStreamContext) -> ObjectStore:
    """The object store of trained adapters and of the latest checkpoint of each running job."""
    return await admin(lambda: _ensure_object_store(js, subjects.ADAPTER_FILES_BUCKET), "adapter files")


async def ensure_ratelimits_bucket(js: JetStreamContext, window_s: float) -> KeyValue:
    """The gateways' shared request counters: in memory, each key dropped two windows after its last write."""
    return await ensure_bucket(js, subjects.RATELIMITS_BUCKET, ttl=2 * window_s, storage=StorageType.MEMORY)


async def ensure_responses_bucket(js: JetStreamContext, ttl: float) -> KeyValue:
    """The stored OpenAI responses (/v1/responses): file storage (a conversation outlives restarts), each record
    dropped `ttl` seconds after it was written. A bucket made with another TTL gets this one (the records
    already in it included: the server applies max age to every message)."""
    kv = await ensure_bucket(js, subjects.RESPONSES_BUCKET, ttl=ttl)
    stream = subjects.kv_stream(subjects.RESPONSES_BUCKET)
    info = await admin(lambda: js.stream_info(stream), f"stream {stream}")
    if round(info.config.max_age or 0) != round(ttl):
        info.config.max_age = ttl
        await admin(lambda: js.update_stream(info.config), f"stream {stream}")
    return kv


async def ensure_training_consumer(js: JetStreamContext, ack_wait: float) -> None:
    """The one pull consumer every trainer shares. A job stays invisible to other trainers while its
    trainer keeps acking "in progress"; `ack_wait` after the last one it is delivered again."""
    from nats.js.api import AckPolicy, ConsumerConfig

    config = ConsumerConfig(
        durable_name=subjects.TRAINING_QUEUE_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=-1,
    )
    await admin(lambda: js.add_consumer(subjects.TRAINING_QUEUE_STREAM, config), "training consumer")
