"""The `cuda-vllm` engine's driver: vLLM's synchronous LLMEngine, stepped by one thread.

The thread owns the LLMEngine (it is not thread-safe): it takes add/abort commands from a queue,
calls `step()` while requests are unfinished, and hands each request's token deltas to that
request's asyncio queue. So the synchronous engine still streams real tokens as they are decoded.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from typing import Any

import structlog

log = structlog.get_logger()

_Item = Any  # a vLLM RequestOutput, or the exception that ended the request


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class SyncDriver:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.engine: Any = None
        self._cv = threading.Condition()
        self._commands: collections.deque[tuple[str, str, Any]] = collections.deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        from vllm.v1.engine.llm_engine import LLMEngine

        self.engine = await asyncio.to_thread(LLMEngine.from_engine_args, self.args)
        self._thread = threading.Thread(target=self._loop, name="vllm-sync-engine", daemon=True)
        self._thread.start()

    # --- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._commands and not self.engine.has_unfinished_requests():
                    self._cv.wait(timeout=1.0)
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for verb, request_id, payload in commands:
                self._apply(verb, request_id, payload)
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine is broken: fail every open stream
                log.exception("vllm_step_failed")
                for request_id in list(self._streams):
                    self._deliver(request_id, exc)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _apply(self, verb: str, request_id: str, payload: Any) -> None:
        if verb == "abort":
            self.engine.abort_request([request_id])
            return
        if verb == "call":
            fn, args, loop, future = payload
            try:
                result: Any = fn(*args)
            except Exception as exc:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
            return
        from vllm.inputs.engine import tokens_input

        prompt_ids, params, lora = payload
        try:
            self.engine.add_request(request_id, tokens_input(prompt_ids), params, lora_request=lora)
        except Exception as exc:
            self._deliver(request_id, exc)

    def _deliver(self, request_id: str, item: _Item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # that event loop is closed: nobody listens any more
            self._streams.pop(request_id, None)

    def _command(self, verb: str, request_id: str, payload: Any = None) -> None:
        with self._cv:
            self._commands.append((verb, request_id, payload))
            self._cv.notify()

    # --- the asyncio side ----------------------------------------------------------------------
    async def stream(self, request_id: str, prompt_ids: list[int], params: Any, lora: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._command("add", request_id, (prompt_ids, params, lora))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._command("abort", request_id)

    async def _call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread (between steps) and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._command("call", "", (fn, args, loop, future))
        return await future

    async def add_lora(self, lora: Any) -> None:
        await self._call(self.engine.add_lora, lora)

    async def remove_lora(self, lora_id: int) -> None:
        await self._call(self.engine.remove_lora, lora_id)

    def unfinished(self) -> int:
        return int(self.engine.get_num_unfinished_requests())

    async def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        if self.engine is not None:
            shutdown = getattr(self.engine.engine_core, "shutdown", None)
            if shutdown is not None:
                await asyncio.to_thread(shutdown)
