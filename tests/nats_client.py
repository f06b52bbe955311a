"""A minimal direct-NATS client for tests: publish requests and collect their replies."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas import codec, subjects
from schemas.inference import Accepted, GenerateRequest, GenerationParams, Reply, StreamEnd, StreamError, TokenChunk


@dataclass
class Collected:
    trace_id: str
    replies: list[Reply] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def worker_id(self) -> str:
        return next((r.worker_id for r in self.replies if isinstance(r, Accepted)), "")

    @property
    def end(self) -> StreamEnd | StreamError | None:
        last = self.replies[-1] if self.replies else None
        return last if isinstance(last, StreamEnd | StreamError) else None

    @property
    def text(self) -> str:
        return "".join(r.chunk for r in self.replies if isinstance(r, TokenChunk))


async def connect(url: str) -> NATS:
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)


def request(model_id: str, prompt: str = "hello", **kw: object) -> GenerateRequest:
    gen = kw.pop("generation", GenerationParams(temperature=0, max_new_tokens=8))
    return GenerateRequest(trace_id=f"t-{uuid.uuid4().hex}", model_id=model_id, prompt=prompt, generation=gen, **kw)  # type: ignore[arg-type]


async def submit(nc: NATS, req: GenerateRequest, subject: str | None = None) -> Collected:
    """Subscribe to the reply subject, then publish on the work queue."""
    out = Collected(req.trace_id)

    async def on_reply(msg: Msg) -> None:
        reply = codec.reply_decoder.decode(msg.data)
        out.replies.append(reply)
        if isinstance(reply, StreamEnd | StreamError):
            out.done.set()

    await nc.subscribe(subjects.stream_subject(req.trace_id), cb=on_reply)
    await nc.flush()
    await nc.jetstream().publish(
        subject or subjects.generate_subject(req.model_id, subjects.tier_of(req.priority)), codec.encode(req)
    )
    return out
