"""`allow_auto_tuning` for the vLLM engines: the memory ladder, and what a model needs, read from its files.

When a vLLM engine cannot start for lack of memory, the engine steps its memory settings down along a
fixed ladder and retries. The ladder, in order (each rung changes one thing from the rung before it):

1. As configured: `gpuMemoryUtilization`, `maxModelLen` from the registry, `max_num_seqs` = worker slots.
2. CUDA only: `gpu_memory_utilization` down by 0.1 per rung, to 0.5 (it is the share of the GPU vLLM takes
   at start; other processes may hold the rest). On CPU vLLM's KV cache is sized explicitly (below), so
   this knob changes nothing there and is skipped.
3. `max_model_len` halved per rung while it is above 2048 (a still useful context).
4. `max_num_seqs` halved per rung down to 1.
5. `max_model_len` halved per rung down to 256.

Before a rung is tried it is checked against the free memory with the model's real sizes (parameter
count from the safetensors headers, KV bytes per token from `config.json`); a rung that cannot fit is
skipped (and logged) without paying for an engine start. A rung that passes the check but whose start
fails is also stepped past: vLLM reports an engine-process failure to its parent only as "Engine core
initialization failed" (the root cause is in that process's log), so such a failure counts as a
possible lack of memory, at most `MAX_FAILED_STARTS` times.

On CPU the KV cache is sized explicitly: KV bytes per token x `max_model_len` x `max_num_seqs` (every
slot can hold a full context, so nothing is ever preempted), or `CY_LLM_VLLM_KV_CACHE_GB` when set
(used as given on the first rung, and as a cap on the later ones). vLLM's own CPU default reserves
`gpu_memory_utilization` x all of the machine's memory, far more than a small model needs on a shared host.

This module does not import vLLM, so it is testable anywhere.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog

from schemas.errors import CyError, ErrorCode

log = structlog.get_logger()

GIB = 1 << 30
# Room for everything besides weights and KV cache (activations, the runtime, the sampler).
OVERHEAD_BYTES = 1 * GIB
MIN_UTILIZATION = 0.5
USEFUL_CONTEXT = 2048
MIN_CONTEXT = 256
MAX_FAILED_STARTS = 3

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8": 1, "int8": 1}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}


class ModelFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a model needs in memory, read from its directory (not guessed from its name)."""

    params: int
    dtype_bytes: int
    kv_bytes_per_token: int
    max_position_embeddings: int

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    def kv_bytes(self, max_model_len: int, max_num_seqs: int) -> int:
        return self.kv_bytes_per_token * max_model_len * max_num_seqs


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal configs nest the language model's sizes.
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _count_params_safetensors(model_dir: Path) -> int:
    """Exact parameter count from the safetensors headers (no tensor is read)."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                total += math.prod(info["shape"])
    return total


def _estimate_params(cfg: dict[str, Any]) -> int:
    """A dense decoder's parameter count from its sizes (used when there are no safetensors)."""
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    inter = cfg.get("intermediate_size") or 4 * hidden
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return embed + layers * (attn + mlp + 2 * hidden) + hidden


def dtype_bytes(dtype: str, cfg: dict[str, Any]) -> int:
    if dtype == "auto":
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return _DTYPE_BYTES.get(dtype.removeprefix("torch."), 4)


def model_facts(model_dir: str | Path, dtype: str) -> ModelFacts:
    """Read `config.json` (and the safetensors headers) of a HF model directory.

    Raises FileNotFoundError when there is no config.json, KeyError when it lacks the basic sizes.
    """
    model_dir = Path(model_dir)
    cfg = _text_config(json.loads((model_dir / "config.json").read_text()))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    width = dtype_bytes(dtype, cfg)
    params = _count_params_safetensors(model_dir) or _estimate_params(cfg)
    return ModelFacts(
        params=params,
        dtype_bytes=width,
        kv_bytes_per_token=2 * cfg["num_hidden_layers"] * kv_heads * head_dim * width,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
    )


class Rung(msgspec.Struct, frozen=True, kw_only=True):
    """One set of memory settings to start vLLM with. `kv_cache_bytes` None = vLLM sizes it itself."""

    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    kv_cache_bytes: int | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.structs.asdict(self)
        if self.kv_cache_bytes is not None:
            out["kv_cache_gib"] = round(self.kv_cache_bytes / GIB, 3)
        return out


def ladder(first: Rung, *, cpu: bool, facts: ModelFacts | None, kv_cap: int | None = None) -> Iterator[Rung]:
    """Yield `first`, then each rung of the documented ladder (module docstring), in order.

    On CPU (`cpu=True`) every rung carries an explicit KV cache size derived from `facts`.
    """

    def sized(util: float, length: int, seqs: int) -> Rung:
        kv = None
        if cpu and facts is not None:
            kv = facts.kv_bytes(length, seqs)
            if kv_cap is not None:
                kv = min(kv, kv_cap)
        return Rung(gpu_memory_utilization=round(util, 2), max_model_len=length, max_num_seqs=seqs, kv_cache_bytes=kv)

    yield first
    util, length, seqs = first.gpu_memory_utilization, first.max_model_len, first.max_num_seqs
    if not cpu:
        while util - 0.1 >= MIN_UTILIZATION - 1e-9:
            util -= 0.1
            yield sized(util, length, seqs)
    while length > USEFUL_CONTEXT:
        length = max(USEFUL_CONTEXT, length // 2)
        yield sized(util, length, seqs)
    while seqs > 1:
        seqs //= 2
        yield sized(util, length, seqs)
    while length > MIN_CONTEXT:
        length = max(MIN_CONTEXT, length // 2)
        yield sized(util, length, seqs)


def first_rung(
    *,
    gpu_memory_utilization: float,
    max_model_len: int,
    max_num_seqs: int,
    cpu: bool,
    facts: ModelFacts | None,
    kv_override: int | None,
) -> Rung:
    """The settings as configured; the model's own context limit caps `max_model_len`."""
    if facts is not None and facts.max_position_embeddings:
        max_model_len = min(max_model_len, facts.max_position_embeddings)
    kv = kv_override
    if kv is None and cpu and facts is not None:
        kv = facts.kv_bytes(max_model_len, max_num_seqs)
    return Rung(
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        kv_cache_bytes=kv,
    )


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    """Free and total bytes of the memory vLLM will allocate from (RAM on CPU, the GPU on CUDA)."""

    free: int
    total: int


def shortfall(rung: Rung, facts: ModelFacts | None, memory: Memory | None) -> str:
    """Why `rung` cannot fit in `memory` ("" when it may fit, or when nothing is known)."""
    if facts is None or memory is None:
        return ""
    weights = facts.weight_bytes
    if rung.kv_cache_bytes is not None:
        need = weights + rung.kv_cache_bytes + OVERHEAD_BYTES
        if need > memory.free:
            return (
                f"needs ~{need / GIB:.2f} GiB (weights {weights / GIB:.2f} + KV cache "
                f"{rung.kv_cache_bytes / GIB:.2f} + overhead {OVERHEAD_BYTES / GIB:.2f}); "
                f"{memory.free / GIB:.2f} GiB free"
            )
        return ""
    # vLLM takes `utilization x total` at start and refuses when that much is not free; the KV cache
    # it then carves out must hold at least one sequence of `max_model_len` tokens.
    budget = rung.gpu_memory_utilization * memory.total
    if budget > memory.free:
        return (
            f"gpu_memory_utilization {rung.gpu_memory_utilization} asks for {budget / GIB:.2f} GiB; "
            f"{memory.free / GIB:.2f} GiB free"
        )
    need = weights + facts.kv_bytes(rung.max_model_len, 1) + OVERHEAD_BYTES
    if need > budget:
        return (
            f"one {rung.max_model_len}-token sequence needs ~{need / GIB:.2f} GiB; the budget is {budget / GIB:.2f} GiB"
        )
    return ""


_MEMORY_WORDS = (
    "out of memory",
    "memory",
    "kv cache",
    "cache blocks",
    "max_model_len",
    "max model len",
    "engine core initialization failed",
    "workerproc initialization failed",
)


def is_memory_failure(exc: BaseException) -> bool:
    """Could this start failure be a lack of memory (so that a smaller rung may succeed)?"""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in _MEMORY_WORDS)


T = TypeVar("T")


async def start_with_ladder(
    rungs: Iterator[Rung],
    try_start: Callable[[Rung], Awaitable[T]],
    *,
    facts: ModelFacts | None,
    memory: Callable[[], Memory | None],
    allow_auto_tuning: bool,
    max_failed_starts: int = MAX_FAILED_STARTS,
) -> tuple[T, Rung]:
    """Start on the first rung that fits and starts; return what `try_start` returned, and that rung.

    Raises CyError(INSUFFICIENT_RESOURCES) when tuning is off and the first rung does not fit or fails
    for lack of memory, or when every rung was tried; a failure that is not about memory is re-raised.
    """
    failed = 0
    last_problem = ""
    for step, rung in enumerate(rungs):
        problem = shortfall(rung, facts, memory())
        if problem:
            last_problem = problem
            log.warning("auto_tuning_skip", step=step, reason=problem, **rung.describe())
            if not allow_auto_tuning:
                raise _insufficient(problem, tuning=False)
            continue
        log.info("auto_tuning_try", step=step, **rung.describe())
        try:
            return await try_start(rung), rung
        except Exception as exc:
            if not is_memory_failure(exc):
                raise
            failed += 1
            last_problem = f"{type(exc).__name__}: {exc}"
            log.warning("auto_tuning_start_failed", step=step, error=last_problem, **rung.describe())
            if not allow_auto_tuning:
                raise _insufficient(last_problem, tuning=False) from exc
            if failed >= max_failed_starts:
                raise _insufficient(f"{failed} starts failed; last: {last_problem}", tuning=True) from exc
    raise _insufficient(f"no rung of the ladder fits; last: {last_problem}", tuning=True)


def _insufficient(problem: str, *, tuning: bool) -> CyError:
    hint = (
        "the auto-tuning ladder is exhausted" if tuning else "allow_auto_tuning is off (CY_LLM_ALLOW_AUTO_TUNING=false)"
    )
    return CyError(ErrorCode.INSUFFICIENT_RESOURCES, f"the vLLM engine cannot start: {problem} ({hint})")
