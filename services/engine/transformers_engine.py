"""The `transformers` engine: a Hugging Face causal LM on CPU or CUDA behind the continuous batcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
import torch

from schemas.errors import CyError, ErrorCode
from schemas.inference import GenerationParams
from services.engine import adapters as lora
from services.engine.base import Engine, EngineStats, StepInbox, TokenStep
from services.engine.batcher import Batcher, Sequence
from services.engine.grammar import Constraint, Grammars, check_schema

log = structlog.get_logger()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def translate_error(exc: BaseException) -> CyError:
    """The one place where torch/transformers failures become wire errors."""
    if isinstance(exc, CyError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return CyError(ErrorCode.INSUFFICIENT_RESOURCES, "the engine ran out of memory", retryable=True)
    return CyError(ErrorCode.INTERNAL_ERROR, f"engine failure: {type(exc).__name__}")


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(
        self,
        model_path: str,
        *,
        max_model_len: int,
        dtype: str = "float32",
        slots: int = 8,
        device: str = "auto",
        prefill_budget: int = 256,
    ) -> None:
        self.model_path = model_path
        self.prefill_budget = prefill_budget
        self.max_model_len = max_model_len
        self.slots = slots
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self._dtype = dtype
        self.tokenizer: Any = None
        self.model: Any = None
        self._batcher: Batcher | None = None
        self._eos: frozenset[int] = frozenset()
        self._adapters: dict[str, str] = {}
        self._grammars: Grammars | None = None  # built on the first json_schema request

    async def start(self) -> None:
        if self._dtype not in _DTYPES:
            raise CyError(ErrorCode.INVALID_REQUEST, f"unknown dtype {self._dtype!r} (one of {sorted(_DTYPES)})")
        try:
            await asyncio.to_thread(self._load)
        except FileNotFoundError as exc:
            raise CyError(ErrorCode.MODEL_NOT_READY, str(exc)) from exc
        except Exception as exc:
            raise translate_error(exc) from exc
        assert self._batcher is not None
        self._batcher.start()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (Path(self.model_path) / "config.json").exists():
            raise FileNotFoundError(f"no model at {self.model_path} (run `python -m services.models`)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=_DTYPES[self._dtype])
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        if str(self.device).startswith("cuda") and self.model.dtype in (torch.bfloat16, torch.float16):
            # cuDNN attention re-plans for every new KV length, i.e. every decode step: measured on an
            # H200, bf16 decode steps took 80 ms with it and 19 ms without (infra/gpu/RESULTS.md).
            torch.backends.cuda.enable_cudnn_sdp(False)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._batcher = Batcher(self.model, self._eos, self.slots, prefill_budget=self.prefill_budget)
        log.info(
            "engine_loaded",
            engine=self.name,
            device=self.device,
            path=self.model_path,
            params=sum(p.numel() for p in self.model.parameters()),
        )

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    async def register_adapter(self, name: str, path: str) -> None:
        """Load LoRA adapter `name` from `path` (replacing one of that name) next to the others; requests
        choose theirs per row. Raises CyError(INVALID_REQUEST) for a directory without a usable adapter."""
        await asyncio.to_thread(self._change_adapters, lora.attach, name, path)
        self._adapters[name] = path

    async def unregister_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._change_adapters, lora.detach, name, "")
        self._adapters.pop(name, None)

    def _change_adapters(self, change: Any, name: str, path: str) -> None:
        assert self._batcher is not None
        with self._batcher.model_lock:  # never while a forward pass runs
            self.model = change(self.model, name, path)
            self._batcher.use_model(self.model, uses_adapters=True)

    async def close(self) -> None:
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.stop)

    @property
    def busy(self) -> int:
        return self._batcher.busy if self._batcher else 0

    def stats(self) -> EngineStats:
        # No prefix cache and no paged KV cache (each sequence's cache is its own): only the queue.
        return EngineStats(waiting=self._batcher.waiting if self._batcher else 0)

    async def _constraint(self, schema: str) -> Constraint:
        """Raises CyError(INVALID_REQUEST) for an unusable schema or when xgrammar is not installed."""
        await check_schema(schema)
        if self._grammars is None:
            self._grammars = await asyncio.to_thread(
                Grammars, self.tokenizer, int(self.model.config.vocab_size), self._eos
            )
        return await asyncio.to_thread(self._grammars.constraint, schema)

    async def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: str) -> AsyncIterator[TokenStep]:
        assert self._batcher is not None
        constraint = await self._constraint(params.json_schema) if params.json_schema else None
        inbox = StepInbox()

        def emit(item: TokenStep | BaseException) -> None:
            if not inbox.put(item):  # the event loop is gone: nobody is listening any more
                seq.cancelled = True

        max_new = min(params.max_new_tokens, self.max_model_len - len(prompt_ids))
        seq = Sequence(prompt_ids, params, max_new, emit, self._batcher.device, adapter, constraint)
        self._batcher.submit(seq)
        try:
            async for step in inbox.steps(translate_error):
                yield step
        finally:
            seq.cancelled = True
