"""Engine names and selection: per model in the registry, overridden by `CY_LLM_ENGINE`."""

from __future__ import annotations

import importlib.util
import os
from typing import Annotated, Literal

import msgspec

from schemas.errors import CyError, ErrorCode
from services.engine.base import Engine
from services.models.registry import ModelSpec

ENGINES = ("transformers", "cpu-openvino", "cuda-vllm-async", "cuda-vllm", "cpu-vllm")


class EngineOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Engine settings beside the model's registry entry (CY_LLM_* variables, see docs/engines.md)."""

    # cpu-openvino: int8 weights (fast default) or exact (fp32 weights and an f32 KV cache: greedy output equal
    # to the transformers fp32 engine, and the same alone or in any batch).
    openvino_precision: Literal["int8", "exact"] = "int8"
    # cpu-openvino: the KV cache's size in GB; requests beyond it wait (or are preempted and recomputed).
    kv_cache_gb: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 2
    # Prompt tokens prefilled per engine step, shared with the decoding streams: a long prompt is split
    # into chunks of this size so that streams already running keep getting a token every step.
    prefill_budget: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 256
    # Compute threads (0 = every core this process may use).
    engine_threads: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0

    def threads(self) -> int:
        return self.engine_threads or len(os.sched_getaffinity(0)) or 1


def openvino_weights(precision: str | None = None) -> Literal["int8", "fp32"]:
    """The export a precision needs (default: CY_LLM_OPENVINO_PRECISION)."""
    chosen = precision or os.environ.get("CY_LLM_OPENVINO_PRECISION") or "int8"
    return "fp32" if chosen == "exact" else "int8"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def select_engine(spec: ModelSpec, override: str = "") -> str:
    """`auto` -> cuda-vllm-async on CUDA with vLLM installed; else cpu-openvino where OpenVINO GenAI is
    installed; else transformers."""
    name = override or spec.engine
    if name == "auto":
        if _cuda():
            return "cuda-vllm-async" if importlib.util.find_spec("vllm") else "transformers"
        return "cpu-openvino" if importlib.util.find_spec("openvino_genai") else "transformers"
    if name not in ENGINES:
        raise CyError(ErrorCode.INVALID_REQUEST, f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return name


def build_engine(
    name: str, spec: ModelSpec, *, slots: int, device: str, options: EngineOptions | None = None
) -> Engine:
    """Instantiate (not load) an engine. Raises CyError when it cannot run on this machine."""
    options = options or EngineOptions()
    if name == "transformers":
        from services.engine.transformers_engine import TransformersEngine

        return TransformersEngine(
            spec.model_path,
            max_model_len=spec.max_model_len,
            dtype=spec.dtype,
            slots=slots,
            device=device,
            prefill_budget=options.prefill_budget,
        )
    if name == "cpu-openvino":
        if importlib.util.find_spec("openvino_genai") is None:
            raise CyError(
                ErrorCode.INSUFFICIENT_RESOURCES,
                "engine 'cpu-openvino' needs openvino-genai, which is not installed (pip install openvino-genai)",
            )
        from services.engine.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(spec, slots=slots, options=options)
    if importlib.util.find_spec("vllm") is None:
        raise CyError(
            ErrorCode.INSUFFICIENT_RESOURCES,
            f"engine {name!r} needs vLLM, which is not installed in this environment (see README: vLLM engines)",
        )
    if name.startswith("cuda-") and not _cuda():
        raise CyError(ErrorCode.INSUFFICIENT_RESOURCES, f"engine {name!r} needs a CUDA GPU; none is visible")
    from services.engine.vllm_engine import VllmEngine  # type: ignore[import-not-found]

    return VllmEngine(name, spec, slots=slots)  # type: ignore[no-any-return]
