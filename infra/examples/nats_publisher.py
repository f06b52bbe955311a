"""A direct NATS publisher: no HTTP, just the documented subjects and msgpack schemas.

    CY_LLM_NATS_URL=nats://127.0.0.1:4222 CY_LLM_INTERNAL_TOKEN=$(cat .data/internal_token) \
        .venv/bin/python -m infra.examples.nats_publisher "Tell me a joke"

Only `nats-py` and `msgspec` are needed; the field names below are the wire contract (README, "NATS").
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
    nc = await nats.connect(
        os.environ.get("CY_LLM_NATS_URL", "nats://127.0.0.1:4222"),
        token=os.environ.get("CY_LLM_INTERNAL_TOKEN") or None,
    )
    js = nc.jetstream()
    trace_id = f"pub-{uuid.uuid4().hex}"
    # 1. Subscribe to the reply subject BEFORE publishing, so no chunk can be missed.
    replies = await nc.subscribe(subjects.stream_subject(trace_id))
    # 2. Publish the request on the work queue (JetStream acks it; a full queue raises at once).
    request = {
        "trace_id": trace_id,
        "model_id": model_id,
        "messages": [{"role": "user", "content": prompt}],  # or "prompt": "raw text"
        "generation": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.95},
        "metadata": {"tenant": "example", "player_id": "player-1", "locale": "en-US"},
        "deadline_ms": int((time.time() + 30) * 1000),
    }
    await js.publish(subjects.generate_subject(model_id, "normal"), msgspec.msgpack.encode(request))
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
