"""The `cpu-openvino` engine: OpenVINO GenAI's continuous-batching pipeline (paged KV cache, split prefill),
run in a process of its own (services/engine/openvino_process.py) and driven from here.

The worker's side keeps the tokenizer (chat template, detokenizing), one entry per request, a writer thread
that sends requests and cancels to the process, and a reader thread that hands each request its new tokens.
A process that dies fails the requests it held (retryable) and is started again.

LoRA adapters: OpenVINO's continuous-batching pipeline silently ignores a per-request adapter (it answers as
the base model), so requests that name an adapter are served by a transformers + peft engine inside this one
(loaded when the first adapter is registered; adapters trained later arrive without a restart). Base
requests never touch it and adapter requests never touch the pipeline: nothing can leak between them.
Requests that ask for alternatives (`top_logprobs` > 0) go there too: the pipeline returns only the chosen
token's logprob. That one it does compute, and it is the raw log-softmax (measured against transformers: equal
to 1e-3 in the exact mode, with or without temperature), so plain `logprobs` stay on the pipeline.

Cached prompt tokens (a request's `cached_tokens`, the prefix-cache counters) come from the process's mirror of
the pipeline's prefix cache (services/engine/prefix_cache.py: how it is computed, and its limits); requests
served by the transformers engine have none.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from schemas.errors import CyError, ErrorCode
from schemas.inference import GenerationParams, TokenLogprob
from services.engine import grammar
from services.engine import openvino_process as proc
from services.engine.base import Engine, EngineDown, EngineStats, StepInbox, TokenStep
from services.engine.engines import EngineOptions, openvino_weights
from services.models.files import ensure_openvino
from services.models.registry import ModelSpec

log = structlog.get_logger()

Emit = Callable[[TokenStep | BaseException], None]

# How long the pipeline process may take to load before the start fails.
LOAD_TIMEOUT_S = 300.0
# Restarts of a dying pipeline process: wait this long first, doubling up to the maximum.
RESTART_BACKOFF_S = (1.0, 30.0)


class _Request:
    def __init__(self, request_id: int, emit: Emit) -> None:
        self.request_id = request_id
        self.emit = emit
        self.cancelled = False


class OpenVinoEngine(Engine):
    name = "cpu-openvino"
    device = "cpu"

    def __init__(self, spec: ModelSpec, *, slots: int = 32, options: EngineOptions | None = None) -> None:
        self.spec = spec
        self.options = options or EngineOptions()
        self.max_model_len = spec.max_model_len
        self.slots = slots
        self.tokenizer: Any = None
        self.model_dir: Path | None = None
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._lock = threading.Lock()  # guards _requests and _conn across the loop and the two threads
        # (request id of an Add, else -1; the encoded command), None to stop the writer
        self._outbox: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._process: Any = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._lora: Any = None  # the transformers engine that serves adapter requests
        self._lora_lock = asyncio.Lock()
        # The pipeline's numbers after its last step, and the prefix-cache totals (queries, hits) of the processes
        # that died before this one (so the counters never go back): one tuple, swapped whole, because the
        # metrics thread reads it.
        self._figures: tuple[proc.Outputs, int, int] = (proc.Outputs(items=[]), 0, 0)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._prepare)
            await asyncio.to_thread(self._spawn)
        except FileNotFoundError as exc:
            raise CyError(ErrorCode.MODEL_NOT_READY, str(exc)) from exc
        except CyError:
            raise
        except Exception as exc:
            log.exception("engine_load_failed", engine=self.name)
            raise CyError(ErrorCode.INTERNAL_ERROR, f"the OpenVINO engine failed to start: {exc}") from exc
        for target, name in ((self._write_loop, "cy-openvino-writer"), (self._read_loop, "cy-openvino-reader")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _prepare(self) -> None:
        from transformers import AutoTokenizer

        self.model_dir = ensure_openvino(self.spec, openvino_weights(self.options.openvino_precision))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)

    def _spawn(self) -> None:
        """Start the pipeline process and wait until it has loaded. Raises CyError if it cannot."""
        assert self.model_dir is not None
        config = proc.PipelineConfig(
            model_dir=str(self.model_dir),
            slots=self.slots,
            exact=self.options.openvino_precision == "exact",
            kv_cache_gb=self.options.kv_cache_gb,
            prefill_budget=self.options.prefill_budget,
            threads=self.options.threads(),
        )
        context = multiprocessing.get_context("spawn")  # never fork a process that holds NATS and threads
        ours, theirs = context.Pipe()
        process = context.Process(target=proc.main, args=(theirs, config), name="cy-openvino", daemon=True)
        process.start()
        theirs.close()
        if not ours.poll(LOAD_TIMEOUT_S):
            process.kill()
            raise CyError(ErrorCode.INTERNAL_ERROR, f"the OpenVINO pipeline did not load in {LOAD_TIMEOUT_S:.0f} s")
        try:
            event = proc.event_decoder.decode(ours.recv_bytes())
        except EOFError:
            raise CyError(
                ErrorCode.INTERNAL_ERROR, f"the OpenVINO pipeline process exited ({process.exitcode}) while loading"
            ) from None
        if isinstance(event, proc.Failed):
            process.join(5)
            raise CyError(ErrorCode.INTERNAL_ERROR, f"the OpenVINO pipeline failed to load: {event.message}")
        assert isinstance(event, proc.Ready)
        with self._lock:
            self._conn, self._process = ours, process
        log.info(
            "engine_loaded",
            engine=self.name,
            path=str(self.model_dir),
            precision=self.options.openvino_precision,
            threads=config.threads,
            kv_cache_gb=config.kv_cache_gb,
            prefill_budget=config.prefill_budget,
            kv_blocks=event.num_blocks or None,
            kv_block_size=event.block_size or None,
            seconds=round(event.seconds, 1),
            pid=process.pid,
        )
        if not event.block_size:
            log.warning("prefix_cache_not_measured", engine=self.name, effect="cached_tokens are reported as 0")

    async def close(self) -> None:
        self._stopping = True
        self._outbox.put((-1, proc.encoder.encode(proc.Stop())))
        self._outbox.put(None)
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.join, 10.0)
            if process.is_alive():
                process.kill()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 5.0)
        with self._lock:
            requests, self._requests = list(self._requests.values()), {}
        for request in requests:
            request.emit(TokenStep([], "cancelled"))
        if self._lora is not None:
            await self._lora.close()

    @property
    def available(self) -> bool:
        with self._lock:
            return self._conn is not None and not self._stopping

    def unfinished_requests(self) -> int:
        """Base-model requests in the pipeline (a cancelled one leaves at once)."""
        with self._lock:
            return len(self._requests)

    @property
    def busy(self) -> int:
        return len(self._requests) + (self._lora.busy if self._lora is not None else 0)

    def stats(self) -> EngineStats:
        last, queries, hits = self._figures
        idle = not self._requests  # the last figures may be from the step that finished the last request
        lora_waiting = (self._lora.stats().waiting or 0) if self._lora is not None else 0
        return EngineStats(
            prefix_cache_queries=queries + last.prefix_queries,
            prefix_cache_hits=hits + last.prefix_hits,
            kv_cache_usage=0.0 if idle else last.kv_usage,
            waiting=(0 if idle else last.waiting) + lora_waiting,
        )

    # --- adapters: served by a transformers + peft engine --------------------------------------
    def adapters(self) -> list[str]:
        return self._lora.adapters() if self._lora is not None else []

    async def _transformers(self) -> Any:
        """The transformers engine beside the pipeline (loaded on first use, ~2 s): it serves what the
        pipeline cannot: adapters, and log probabilities (OpenVINO's pipeline gives no alternatives)."""
        async with self._lora_lock:
            if self._lora is None:
                from services.engine.transformers_engine import TransformersEngine  # torch: only when needed

                lora = TransformersEngine(
                    self.spec.model_path,
                    max_model_len=self.max_model_len,
                    dtype="float32",
                    slots=self.slots,
                    prefill_budget=self.options.prefill_budget,
                )
                await lora.start()
                self._lora = lora
                log.info("transformers_engine_loaded", reason="adapter or logprobs requests")
        return self._lora

    async def register_adapter(self, name: str, path: str) -> None:
        await (await self._transformers()).register_adapter(name, path)

    async def unregister_adapter(self, name: str) -> None:
        if self._lora is not None:
            await self._lora.unregister_adapter(name)

    # --- generation ----------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: str) -> AsyncIterator[TokenStep]:
        if adapter:
            if self._lora is None or not self._lora.has_adapter(adapter):
                raise CyError(ErrorCode.MODEL_NOT_FOUND, f"adapter {adapter!r} is not loaded")
            async for step in self._lora.generate(prompt_ids, params, adapter):
                yield step
            return
        if params.logprobs and params.top_logprobs > 0:  # alternatives: the pipeline computes none
            async for step in (await self._transformers()).generate(prompt_ids, params, ""):
                yield step
            return
        if self._stopping:
            raise CyError(ErrorCode.INTERNAL_ERROR, "the engine is shutting down", retryable=True)
        if not self.available:
            raise EngineDown("the engine process is restarting")
        inbox = StepInbox()

        def emit(item: TokenStep | BaseException) -> None:
            if not inbox.put(item):  # the event loop is gone: nobody is listening any more
                request.cancelled = True

        if params.json_schema:
            await grammar.check_schema(params.json_schema)
        request = _Request(next(self._ids), emit)
        add = proc.Add(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            max_new_tokens=min(params.max_new_tokens, self.max_model_len - len(prompt_ids)),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            # An unseeded request still needs its own draw: OpenVINO's default seed is the same for all.
            seed=params.seed if params.seed is not None else secrets.randbits(32),
            json_schema=params.json_schema,
            logprobs=params.logprobs,
        )
        with self._lock:
            self._requests[request.request_id] = request
        self._outbox.put((request.request_id, proc.encoder.encode(add)))
        try:
            async for step in inbox.steps(lambda error: error):  # errors arrive as CyErrors already
                yield step
        finally:
            with self._lock:
                still_running = self._requests.pop(request.request_id, None) is not None
            if still_running:  # closed early (cancel, disconnect, stop string): free its slot in the pipeline
                request.cancelled = True
                self._outbox.put((-1, proc.encoder.encode(proc.Cancel(request_id=request.request_id))))

    # --- the threads that talk to the process ---------------------------------------------------
    def _write_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            request_id, data = item
            with self._lock:
                conn = self._conn
            try:
                if conn is None:
                    raise OSError("no engine process")
                conn.send_bytes(data)
            except (OSError, ValueError):  # the process is dead or restarting: the request cannot run now
                if request_id >= 0:
                    self._fail([request_id], EngineDown("the engine process is restarting"))

    def _read_loop(self) -> None:
        backoff = RESTART_BACKOFF_S[0]
        while not self._stopping:
            with self._lock:
                conn = self._conn
            try:
                assert conn is not None
                event = proc.event_decoder.decode(conn.recv_bytes())
            except (EOFError, OSError, AssertionError):
                if self._stopping:
                    return
                backoff = self._restart(backoff)
                continue
            backoff = RESTART_BACKOFF_S[0]
            match event:
                case proc.Outputs(items=items):
                    _, queries, hits = self._figures
                    self._figures = (event, queries, hits)
                    self._deliver(items)
                case proc.StepFailed(request_ids=ids, message=message):
                    log.error("engine_step_failed", engine=self.name, error=message, requests=len(ids))
                    self._fail(ids, CyError(ErrorCode.INTERNAL_ERROR, "engine failure in a batch step"))

    def _deliver(self, items: list[proc.Output]) -> None:
        with self._lock:
            found = [(item, self._requests.get(item.request_id)) for item in items]
            for item, _ in found:
                if item.finish:
                    self._requests.pop(item.request_id, None)
        for item, request in found:
            if request is None or request.cancelled:
                continue
            if item.finish == "ignored":
                request.emit(
                    CyError(
                        ErrorCode.INSUFFICIENT_RESOURCES,
                        "the prompt does not fit in the engine's KV cache (raise CY_LLM_KV_CACHE_GB)",
                    )
                )
            else:
                logprobs = (
                    [TokenLogprob(token_id=t, logprob=lp) for t, lp in zip(item.token_ids, item.logprobs, strict=False)]
                    if item.logprobs
                    else None
                )
                request.emit(TokenStep(item.token_ids, item.finish or None, logprobs, item.cached))  # type: ignore[arg-type]

    def _fail(self, request_ids: list[int], error: CyError) -> None:
        with self._lock:
            requests = [r for i in request_ids if (r := self._requests.pop(i, None)) is not None]
        for request in requests:
            request.emit(error)

    def _restart(self, backoff: float) -> float:
        """The process died: fail what it held (retryable), start it again after `backoff` seconds."""
        process = self._process
        exitcode = process.exitcode if process is not None else None
        with self._lock:
            self._conn = None
            held = list(self._requests)
        last, queries, hits = self._figures
        self._figures = (proc.Outputs(items=[]), queries + last.prefix_queries, hits + last.prefix_hits)
        log.error("engine_process_died", engine=self.name, exitcode=exitcode, requests=len(held), restart_in_s=backoff)
        self._fail(held, EngineDown("the engine process died mid-request"))
        time.sleep(backoff)
        if self._stopping:
            return backoff
        try:
            self._spawn()
        except CyError as exc:
            log.error("engine_restart_failed", engine=self.name, error=exc.body.message)
        return min(backoff * 2, RESTART_BACKOFF_S[1])
