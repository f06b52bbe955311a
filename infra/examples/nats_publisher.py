"""A direct NATS publisher: no HTTP, just the documented subjects and msgpack schemas.

    .venv/bin/python -m infra.nats mint-publisher my-service     # once: prints (and saves) the credential
    env $(cat .data/publisher-my-service.env) CY_LLM_NATS_URL=nats://127.0.0.1:4222 \
        .venv/bin/python -m infra.examples.nats_publisher "Tell me a joke"

Only `nats-py` and `msgspec` are needed; the field names below are the wire contract (README, "NATS").
A publisher's NATS user may only read its own replies: its trace ids are `<its name>.<anything>`, and its
inbox prefix is `_INBOX_pub.<its name>` (where JetStream acks come back).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import msgspec
import nats

from schemas import subjects


async def main(prompt: str, model_id: str) -> int:
    # A server started without an internal token has no users: then any name will do.
    name = os.environ.get("CY_LLM_NATS_USER") or "example"
    nc = await nats.connect(
        os.environ.get("CY_LLM_NATS_URL", "nats://127.0.0.1:4222"),
        user=os.environ.get("CY_LLM_NATS_USER") or None,
        password=os.environ.get("CY_LLM_NATS_PASSWORD") or None,
        inbox_prefix=subjects.publisher_inbox_prefix(name),  # "_INBOX_pub.<name>"
    )
    js = nc.jetstream()
    trace_id = subjects.owned_trace_id(name, uuid.uuid4().hex)  # "<name>.<hex>"
    # 1. Subscribe to the reply subject ("cy.v1.stream.<name>.<hex>") BEFORE publishing, so no chunk is missed.
    #    Cancel with a publish on subjects.cancel_subject(trace_id) ("cy.v1.cancel.<name>.<hex>").
    replies = await nc.subscribe(subjects.stream_subject(trace_id))
    # 2. Publish the request on this publisher's own request subject ("cy.v1.pub.<name>.<model>.normal"):
    #    JetStream acks it; more than CY_LLM_PUBLISHER_MAX_PENDING queued (per model and tier) raises at once.
    request = {
        "trace_id": trace_id,
        "model_id": model_id,
        "messages": [{"role": "user", "content": prompt}],  # or "prompt": "raw text"
        "generation": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.95},
        "metadata": {"tenant": "example", "player_id": "player-1", "locale": "en-US"},
        "deadline_ms": int((time.time() + 30) * 1000),
    }
    await js.publish(subjects.published_subject(name, model_id, "normal"), msgspec.msgpack.encode(request))
    # 3. Read replies until "end" or "error" (a real client also watches the worker's heartbeat).
    code = 0
    while True:
        msg = await replies.next_msg(timeout=60)
        reply = msgspec.msgpack.decode(msg.data)
        if reply["type"] == "accepted":
            print(f"[worker {reply['worker_id']}, prompt {reply['prompt_tokens']} tokens]", file=sys.stderr)
        elif reply["type"] == "chunk":
            print(reply["chunk"], end="", flush=True)
        elif reply["type"] == "end":
            print(f"\n[{reply['finish_reason']}: {reply['completion_tokens']} tokens]", file=sys.stderr)
            break
        elif reply["type"] == "error":
            print(f"\n[error {reply['code']}: {reply['message']}]", file=sys.stderr)
            code = 1
            break
    await nc.drain()
    return code


if __name__ == "__main__":
    text = sys.argv[1] if len(sys.argv) > 1 else "Hello!"
    sys.exit(asyncio.run(main(text, os.environ.get("CY_LLM_MODEL", "smollm2-135m-instruct"))))
