"""The process that owns OpenVINO GenAI's continuous-batching pipeline for the `cpu-openvino` engine.

Why a process: the pipeline's `step()` holds the GIL for the whole forward pass (its Python binding does not
release it), which starved the worker's event loop (measured: loop lag p50 30 ms, p99 540 ms, and half the
tokens/s with 8 streams). In a process of its own it runs at full speed and the worker's loop stays free.

The loop: read what the worker sent (requests, cancels; blocking only when idle), add new requests
shortest prompt first, run one `step()` (every running sequence gets a token; prompts are prefilled in
chunks that fill the rest of the step's `max_num_batched_tokens`, so a long prompt never stalls the
streams already running), then send every request's new tokens back in one message. Newcomers do not
wait behind a long prompt's prefill (see `_Loop._yield_long_prefills`).

The pipeline reuses cached prompt blocks but does not say how many; `services/engine/prefix_cache.py` mirrors its
block bookkeeping to tell each request (its first Output's `cached`) and to count queries and hits.
"""

from __future__ import annotations

import itertools
import time
from multiprocessing.connection import Connection
from typing import Any, Literal

import msgspec

from services.engine.prefix_cache import PrefixCache


# --- messages between the worker and this process (msgpack over a multiprocessing Pipe) -------------
class Add(msgspec.Struct, tag=True):
    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    json_schema: str = ""  # constrained decoding (OpenVINO GenAI's built-in xgrammar backend); "" = none
    logprobs: bool = False  # the chosen tokens' log probabilities (the pipeline computes no alternatives)


class Cancel(msgspec.Struct, tag=True):
    request_id: int


class Stop(msgspec.Struct, tag=True):
    pass


Command = Add | Cancel | Stop


class Ready(msgspec.Struct, tag=True):
    eos_ids: list[int]
    seconds: float
    # The KV cache as measured at warm-up (0: not measured, and no cached tokens are reported).
    block_size: int = 0
    num_blocks: int = 0


class Failed(msgspec.Struct, tag=True):
    message: str


class Output(msgspec.Struct, array_like=True):
    request_id: int
    token_ids: list[int]
    # "" while running; "stop" / "length" when it ended; "ignored" when the prompt cannot fit the KV cache.
    finish: Literal["", "stop", "length", "ignored"] = ""
    logprobs: list[float] = []  # one per token id, when the request asked for them
    cached: int = 0  # on a request's first output: prompt tokens it took from the prefix cache


class Outputs(msgspec.Struct, tag=True):
    """One step's outputs, and the pipeline's numbers after it (the prefix cache's since the process started)."""

    items: list[Output]
    kv_usage: float = 0.0  # fraction of the KV blocks that running sequences held in the step
    waiting: int = 0  # requests in the pipeline that the step did not schedule, plus long prompts set aside
    prefix_queries: int = 0
    prefix_hits: int = 0


class StepFailed(msgspec.Struct, tag=True):
    request_ids: list[int]
    message: str


Event = Ready | Failed | Outputs | StepFailed

encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
event_decoder = msgspec.msgpack.Decoder(Event)


class PipelineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_dir: str
    slots: int
    exact: bool
    kv_cache_gb: int
    prefill_budget: int
    threads: int


# --- the child process -------------------------------------------------------------------------------
def main(conn: Connection, config: PipelineConfig) -> None:
    """Entry point of the spawned process: load, say Ready (or Failed), then serve until Stop or EOF."""
    try:
        started = time.monotonic()
        pipe = _load(config)
        cache = _warm_up(pipe)
        eos = pipe.get_config().eos_token_id
        ready = Ready(
            eos_ids=[eos] if eos >= 0 else [],
            seconds=time.monotonic() - started,
            block_size=cache.block_size if cache else 0,
            num_blocks=cache.num_blocks if cache else 0,
        )
        conn.send_bytes(encoder.encode(ready))
    except Exception as exc:
        conn.send_bytes(encoder.encode(Failed(message=f"{type(exc).__name__}: {exc}")))
        return
    try:
        _Loop(pipe, conn, config.prefill_budget, cache).run()
    except (EOFError, OSError, KeyboardInterrupt):  # the worker is gone or stopping: nothing to answer
        pass


def _load(config: PipelineConfig) -> Any:
    import openvino_genai as ov_genai

    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = config.kv_cache_gb
    scheduler.max_num_seqs = config.slots
    # At least one token for every running stream, so none skips a step. A smaller budget shortens the stall a
    # long prompt's prefill causes but cannot bound it: a budget counts tokens, and late in a 7,800-token prompt
    # 24 prompt tokens cost ~4x a whole 8-stream decode step, mostly attention over the prefix (2 cores; measured
    # with infra/bench/long_prompt.py, table in docs/engines.md).
    scheduler.max_num_batched_tokens = max(config.prefill_budget, config.slots)
    scheduler.dynamic_split_fuse = True
    # Shared prompt prefixes (system prompts, chat templates) are computed once; and a long prompt that yields
    # to newcomers (see _Loop._yield_long_prefills) resumes from the blocks it had computed.
    scheduler.enable_prefix_caching = True
    # These CPUs may have AMX/AVX-512, where OpenVINO computes in bf16 unless told otherwise: slower here and
    # less accurate. f32 activations always; the exact mode also keeps the KV cache in f32.
    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": config.threads}
    if config.exact:
        properties["KV_CACHE_PRECISION"] = "f32"
    return ov_genai.ContinuousBatchingPipeline(config.model_dir, scheduler, "CPU", properties)


def _warm_up(pipe: Any) -> PrefixCache | None:
    """One short request through every stage, so that the first real one does not pay for the kernels'
    first-use preparation (measured: TTFT 300 ms cold, 25-50 ms warm).

    It also measures the KV cache for the prefix-cache mirror: returns the mirror, holding the warm-up request's
    blocks as the pipeline does, or None when the measure is not what a paged cache gives (see `measure_blocks`).
    """
    import numpy as np
    import openvino as ov

    warm = Add(0, list(range(100, 164)), 4, 0.0, 1.0, 0, 1.0, 0.0, 0.0, 0)
    config = generation_config(warm)
    config.ignore_eos = True  # its four tokens, always: the measure needs two
    handle = pipe.add_request(0, ov.Tensor(np.asarray([warm.prompt_ids], dtype=np.int64)), config)
    generated: list[int] = []
    usage: list[float] = []
    while pipe.has_non_finished_requests():
        pipe.step()
        tokens = [t for out in handle.read().values() for t in out.generated_ids] if handle.can_read() else []
        if tokens:
            generated.extend(tokens)
            usage.append(pipe.get_metrics().cache_usage)
    blocks = measure_blocks(len(warm.prompt_ids), usage)
    if blocks is None:
        return None
    cache = PrefixCache(num_blocks=blocks[0], block_size=blocks[1])
    cache.admit(0, warm.prompt_ids)
    cache.extend(0, generated)
    cache.release(0)
    cache.queries = cache.hits = 0
    return cache


def measure_blocks(prompt_len: int, usage: list[float]) -> tuple[int, int] | None:
    """(number of KV blocks, tokens per block) from one sequence's `cache_usage` (percent of blocks in use) at
    the steps that gave its first and second token: its context is then `prompt_len` tokens, then one more, so
    it holds prompt_len / block_size blocks, then one more. None when that does not hold (a block size that does
    not divide `prompt_len`, or no second token)."""
    if len(usage) < 2 or usage[0] <= 0 or usage[1] <= usage[0]:
        return None
    block = usage[1] - usage[0]  # one block, in percent
    num_blocks, block_size = round(100 / block), round(prompt_len * block / usage[0])
    if block_size < 1 or prompt_len % block_size:
        return None
    if abs(usage[0] - 100 * prompt_len / block_size / num_blocks) > block / 4:  # not a whole number of blocks
        return None
    return num_blocks, block_size


def generation_config(add: Add) -> Any:
    """A request's sampling parameters as an OpenVINO GenerationConfig (stop strings: the worker's job)."""
    import openvino_genai as ov_genai

    config = ov_genai.GenerationConfig()
    config.max_new_tokens = add.max_new_tokens
    config.repetition_penalty = add.repetition_penalty
    config.presence_penalty = add.presence_penalty
    config.frequency_penalty = add.frequency_penalty
    if add.logprobs:
        config.logprobs = 1  # the chosen token's (the only one this release returns)
    if add.json_schema:  # checked by the worker first (grammar.check_schema): a bad one fails the whole step
        config.structured_output_config = ov_genai.StructuredOutputConfig(json_schema=add.json_schema)
    if add.temperature == 0:
        config.do_sample = False
        return config
    config.do_sample = True
    config.temperature = add.temperature
    config.top_p = add.top_p
    if add.top_k > 0:
        config.top_k = add.top_k
    config.rng_seed = add.seed
    return config


class _Entry:
    """A request in the pipeline: its handle (under a pipeline id of its own: a re-added request gets a new
    one), what has been generated so far, and its prompt tokens found in the prefix cache when it was first
    added (sent with its first output)."""

    def __init__(self, add: Add, handle: Any, cached: int) -> None:
        self.add = add
        self.handle = handle
        self.generated = 0
        self.cached = cached
        self.reported = False


class _Loop:
    def __init__(self, pipe: Any, conn: Connection, prefill_budget: int, cache: PrefixCache | None = None) -> None:
        import openvino as ov
        import openvino_genai as ov_genai

        self.pipe = pipe
        self.conn = conn
        self.ov = ov
        self.status = ov_genai.GenerationStatus
        self.reasons = ov_genai.GenerationFinishReason
        self.long_prompt = 2 * prefill_budget
        self.cache = cache
        self.pipeline_ids = itertools.count(1)  # 0 was the warm-up request
        self.active: dict[int, _Entry] = {}  # by the worker's request id
        self.pending: list[Add] = []
        self.readd: list[_Entry] = []
        self.cancelled: set[int] = set()

    def run(self) -> None:
        while True:
            if not self._receive(block=not self.active and not self.readd):
                self._release_all()
                return
            for request_id in self.cancelled:
                entry = self.active.pop(request_id, None)
                if entry is not None:
                    entry.handle.cancel()
                    self._forget(request_id)
            for entry in self.readd:
                if entry.add.request_id in self.cancelled:
                    self._forget(entry.add.request_id)
            self.readd = [entry for entry in self.readd if entry.add.request_id not in self.cancelled]
            arrived = sorted(
                (add for add in self.pending if add.request_id not in self.cancelled), key=lambda a: len(a.prompt_ids)
            )
            self.cancelled.clear()
            self.pending.clear()
            readd, self.readd = self.readd, []
            if arrived:
                self._yield_long_prefills(arrived)
            for add in arrived:
                cached = self.cache.admit(add.request_id, add.prompt_ids) if self.cache else 0
                self.active[add.request_id] = _Entry(add, self._submit(add), cached)
            for entry in readd:  # resumes from its own cached blocks: its count stays the one of its first add
                entry.handle = self._submit(entry.add)
                self.active[entry.add.request_id] = entry
            if not self.active:
                if self.pipe.has_non_finished_requests():
                    self.pipe.step()  # lets the pipeline free (and cache) what cancelled requests held
                    self._send(self._outputs([]))
                continue
            try:
                self.pipe.step()
            except Exception as exc:  # fails the requests in flight, never the process
                failed = list(self.active)
                for request_id, entry in self.active.items():
                    entry.handle.cancel()
                    self._forget(request_id)
                self.active.clear()
                self._send(StepFailed(request_ids=failed, message=f"{type(exc).__name__}: {exc}"))
                continue
            self._send(self._outputs(self._collect()))

    def _submit(self, add: Add) -> Any:
        import numpy as np

        ids = self.ov.Tensor(np.asarray([add.prompt_ids], dtype=np.int64))
        return self.pipe.add_request(next(self.pipeline_ids), ids, generation_config(add))

    def _forget(self, request_id: int) -> None:
        """The request left the pipeline: in the mirror its blocks stay cached, owned by no one."""
        if self.cache is not None:
            self.cache.release(request_id)

    def _outputs(self, items: list[Output]) -> Outputs:
        metrics = self.pipe.get_metrics()
        running = self.pipe.has_non_finished_requests()
        return Outputs(
            items=items,
            # With nothing left in the pipeline no block is held (the last step's figure still counts the blocks
            # of the requests it finished).
            kv_usage=metrics.cache_usage / 100 if running else 0.0,
            waiting=(max(metrics.requests - metrics.scheduled_requests, 0) if running else 0) + len(self.readd),
            prefix_queries=self.cache.queries if self.cache else 0,
            prefix_hits=self.cache.hits if self.cache else 0,
        )

    def _yield_long_prefills(self, arrived: list[Add]) -> None:
        """Newcomers go before long prompts still being prefilled.

        The pipeline prefills prompts first come, first served: a short request arriving just after a
        7,000-token prompt would wait for all of it. So a long prompt with no output yet is cancelled and
        added again after the newcomers, one step later (once the pipeline has put the blocks it computed
        into the prefix cache): it resumes where it was, since the prefix cache hands those blocks back,
        and its output is the same.
        """
        shortest = len(arrived[0].prompt_ids)
        for request_id, entry in list(self.active.items()):
            prompt = len(entry.add.prompt_ids)
            if entry.generated == 0 and prompt > self.long_prompt and prompt > 2 * shortest:
                entry.handle.cancel()
                del self.active[request_id]
                self.readd.append(entry)

    def _release_all(self) -> None:
        """Cancel what is left and let the pipeline free its KV blocks (a clean exit, no leak report)."""
        for entry in self.active.values():
            entry.handle.cancel()
        self.active.clear()
        while self.pipe.has_non_finished_requests():
            self.pipe.step()

    def _receive(self, *, block: bool) -> bool:
        """Take every command waiting (wait for one when idle). False on Stop."""
        timeout: float | None = None if block else 0.0
        while self.conn.poll(timeout):
            match command_decoder.decode(self.conn.recv_bytes()):
                case Add() as add:
                    self.pending.append(add)
                case Cancel(request_id=request_id):
                    self.cancelled.add(request_id)
                case Stop():
                    return False
            timeout = 0.0
        return True

    def _collect(self) -> list[Output]:
        out: list[Output] = []
        for request_id, entry in list(self.active.items()):
            handle = entry.handle
            tokens: list[int] = []
            logprobs: list[float] = []
            finish = ""
            if handle.can_read():
                for output in handle.read().values():
                    tokens.extend(output.generated_ids)
                    if entry.add.logprobs:
                        logprobs.extend(output.generated_log_probs)
                    if output.finish_reason == self.reasons.LENGTH:
                        finish = "length"
                    elif output.finish_reason != self.reasons.NONE:
                        finish = finish or "stop"
            state = handle.get_status()
            entry.generated += len(tokens)
            if self.cache is not None:
                self.cache.extend(request_id, tokens)
            if state == self.status.IGNORED:
                finish = "ignored"
            elif state != self.status.RUNNING and not finish:
                finish = "length" if entry.generated >= entry.add.max_new_tokens else "stop"
            if finish:
                del self.active[request_id]
                if state == self.status.RUNNING:
                    handle.cancel()
                self._forget(request_id)
            if tokens or finish:
                cached = 0 if entry.reported else entry.cached
                entry.reported = True
                out.append(Output(request_id, tokens, finish, logprobs, cached))  # type: ignore[arg-type]
        return out

    def _send(self, event: Event) -> None:
        self.conn.send_bytes(encoder.encode(event))
