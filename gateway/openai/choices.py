"""The n generations behind one OpenAI request, run concurrently and merged into one reply sequence.

Each GenerateRequest gets its own reply stream (gateway.generation.streaming); a small task per stream
pumps its replies into one bounded queue, so the HTTP side reads a single ordered-per-choice sequence and
can send keep-alives while nothing arrives. Closing aborts every unfinished generation on its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from gateway.core import GatewayCore
from gateway.generation import Outcome, streaming
from gateway.inference_client import ReplyStream
from schemas.errors import CyError, ErrorCode
from schemas.inference import GenerateRequest, Reply, StreamEnd, StreamError
from services.runtime import raise_if_cancelled, shielded

log = structlog.get_logger()

_Item = tuple[int, Reply | CyError]


class Choices:
    """`async with Choices(core, requests) as c: async for item in c.replies(keepalive): ...`

    For a streamed HTTP response the handler returns before the body is sent, so `start()` and `close()`
    are also usable on their own (the SSE generator's `finally` calls `close()`).
    """

    def __init__(
        self,
        core: GatewayCore,
        requests: list[GenerateRequest],
        hold: contextlib.AbstractAsyncContextManager[None] | None = None,
    ) -> None:
        self._core = core
        self._hold = hold  # e.g. the client's rate-limit slot: held from start() to close()
        self.requests = requests
        self.outcomes = [Outcome() for _ in requests]
        self._stack = contextlib.AsyncExitStack()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=64 * len(requests))
        self._tasks: list[asyncio.Task[None]] = []
        self._early: list[_Item] = []
        self._open = len(requests)
        self._closed = False

    async def __aenter__(self) -> Choices:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Enqueue every request. Raises CyError (rate limited, no worker, queue full, draining gateway)."""
        try:
            if self._hold is not None:
                await self._stack.enter_async_context(self._hold)
            for i, request in enumerate(self.requests):
                stream = await self._stack.enter_async_context(streaming(self._core, request))
                self._tasks.append(asyncio.create_task(self._pump(i, stream), name=f"pump-{request.trace_id}"))
        except BaseException:
            await self.close()
            raise

    async def first_replies(self, grace: float) -> None:
        """Wait up to `grace` seconds for every choice's first reply, so that a failure found early (prompt too
        long, unknown adapter, dead queue) becomes a real HTTP status. Raises CyError."""
        deadline = time.monotonic() + grace
        waiting = set(range(len(self.requests)))
        while waiting and (left := deadline - time.monotonic()) > 0:
            raise_if_cancelled()
            try:
                with self._core.ended_by_drain():
                    item = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                return
            self._early.append(item)
            i, reply = item
            if isinstance(reply, CyError):
                raise reply
            if isinstance(reply, StreamError):
                raise CyError(reply.code, reply.message, retryable=reply.retryable, retry_after=reply.retry_after)
            waiting.discard(i)

    async def replies(self, keepalive: float | None = None) -> AsyncIterator[tuple[int, Reply] | None]:
        """(choice index, reply) in arrival order, folded into `outcomes`; None after `keepalive` idle seconds.

        Ends after every choice's StreamEnd. Raises CyError when any choice fails.
        """
        while self._open > 0:
            raise_if_cancelled()
            if self._early:
                i, reply = self._early.pop(0)
            else:
                try:
                    # The streams are read by the pumps: a drain's cancel reaches this task here.
                    with self._core.ended_by_drain():
                        i, reply = await asyncio.wait_for(self._queue.get(), keepalive)
                except TimeoutError:
                    yield None
                    continue
            if isinstance(reply, CyError):
                raise reply
            self.outcomes[i].observe(reply)  # raises CyError for StreamError
            if isinstance(reply, StreamEnd):
                self._open -= 1
            yield i, reply

    async def close(self) -> None:
        """Stop the pumps and leave every stream; unfinished generations get their cancel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # Shielded: a disconnecting client cancels this very task, and the workers must still hear the cancel.
        await shielded(self._finish())

    async def _finish(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()

    async def _pump(self, i: int, stream: ReplyStream) -> None:
        try:
            while not stream.finished:
                reply = await stream.next()
                if reply is not None:
                    await self._queue.put((i, reply))
        except CyError as exc:
            await self._queue.put((i, exc))
        except Exception as exc:
            log.exception("reply_stream_failed", trace_id=stream.request.trace_id)
            await self._queue.put((i, CyError(ErrorCode.INTERNAL_ERROR, f"reply stream failed: {type(exc).__name__}")))

    # --- totals for the usage block and the log line ----------------------------------------------------

    def usage(self, n: int) -> dict[str, Any]:
        """Each prompt counted once (choices p*n .. p*n+n-1 share prompt p), every completion counted; cached
        prompt tokens those of the prompts counted (OpenAI's `prompt_tokens_details.cached_tokens`)."""
        prompt = sum(o.prompt_tokens for o in self.outcomes[::n])
        cached = sum(o.cached_tokens for o in self.outcomes[::n])
        completion = sum(o.completion_tokens for o in self.outcomes)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def log_fields(self) -> dict[str, object]:
        first = self.outcomes[0].log_fields()
        ttfts = [o.ttft_ms for o in self.outcomes if o.ttft_ms is not None]
        return {
            **first,
            "choices": len(self.outcomes),
            "prompt_tokens": sum(o.prompt_tokens for o in self.outcomes),
            "cached_tokens": sum(o.cached_tokens for o in self.outcomes),
            "completion_tokens": sum(o.completion_tokens for o in self.outcomes),
            "ttft_ms": round(min(ttfts), 1) if ttfts else None,
            "finish_reason": first["finish_reason"]
            if len(self.outcomes) == 1
            else [o.finish_reason for o in self.outcomes],
        }
