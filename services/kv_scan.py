"""Read every live entry of a KV bucket, reliably.

nats-py's `kv.keys()` and `kv.watchall()` signal "no more initial values" with a marker that can come
*before* the values: the watcher asks the consumer how many messages are pending, and when the server has
already pushed them all (pending 0) but the callback has not yet counted one, it queues the marker first.
Under load a listing then reads as empty (a training list with no jobs, a gateway that sees no workers).
The stream's own subject index has no such race: one `stream_info` names every key that has a message,
then each key is read (deleted ones skipped).
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from schemas import subjects


async def keys(js: JetStreamContext, bucket: str, pattern: str = ">") -> list[str]:
    """The keys of `bucket` matching `pattern` that have a message (deleted ones included). [] if no bucket."""
    try:
        info = await js.stream_info(subjects.kv_stream(bucket), subjects_filter=f"$KV.{bucket}.{pattern}")
    except NotFoundError:
        return []
    prefix = f"$KV.{bucket}."
    return [subject.removeprefix(prefix) for subject in (info.state.subjects or {})]


async def entries(js: JetStreamContext, kv: KeyValue, bucket: str, pattern: str = ">") -> dict[str, bytes]:
    """Every live (not deleted, not empty) value of `bucket` whose key matches `pattern`, by key."""
    found: dict[str, bytes] = {}
    for key in await keys(js, bucket, pattern):
        try:
            entry = await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            continue  # deleted or purged since the index was read
        if entry.value:
            found[key] = entry.value
    return found
