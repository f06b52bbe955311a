"""Engine names and selection: per model in the registry, overridden by `CY_LLM_ENGINE`."""

from __future__ import annotations

import importlib.util

from schemas.errors import CyError, ErrorCode
from services.engine.base import Engine
from services.engine.registry import ModelSpec

ENGINES = ("transformers", "cuda-vllm-async", "cuda-vllm", "cpu-vllm")


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def select_engine(spec: ModelSpec, override: str = "") -> str:
    """`auto` -> cuda-vllm-async on CUDA with vLLM installed, else transformers."""
    name = override or spec.engine
    if name == "auto":
        return "cuda-vllm-async" if _cuda() and importlib.util.find_spec("vllm") else "transformers"
    if name not in ENGINES:
        raise CyError(ErrorCode.INVALID_REQUEST, f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return name


def build_engine(name: str, spec: ModelSpec, *, slots: int, device: str) -> Engine:
    """Instantiate (not load) an engine. Raises CyError when it cannot run on this machine."""
    if name == "transformers":
        from services.engine.transformers_engine import TransformersEngine

        return TransformersEngine(
            spec.model_path, max_model_len=spec.max_model_len, dtype=spec.dtype, slots=slots, device=device
        )
    if importlib.util.find_spec("vllm") is None:
        raise CyError(
            ErrorCode.INSUFFICIENT_RESOURCES,
            f"engine {name!r} needs vLLM, which is not installed in this environment (see README: vLLM engines)",
        )
    if name.startswith("cuda-") and not _cuda():
        raise CyError(ErrorCode.INSUFFICIENT_RESOURCES, f"engine {name!r} needs a CUDA GPU; none is visible")
    from services.engine.vllm_engine import VllmEngine  # type: ignore[import-not-found]

    return VllmEngine(name, spec, slots=slots)  # type: ignore[no-any-return]
