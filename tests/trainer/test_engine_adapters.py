"""Several LoRA adapters on one transformers engine: chosen per request, batched together without mixing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from schemas.errors import CyError
from schemas.inference import ChatMessage, GenerateRequest, GenerationParams
from services.engine.registry import Registry
from services.engine.transformers_engine import TransformersEngine

GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
PROMPT = "Tell me a story about a cat."


def make_adapter(model_path: str, target: Path, seed: int) -> str:
    """A LoRA adapter with random (non-zero) weights: it changes what the model says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def adapter_dirs(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    path = registry.models["tiny"].model_path
    return {name: make_adapter(path, root / name, seed) for name, seed in (("first-style", 1), ("second-style", 2))}


@pytest.fixture(scope="module")
async def engine(registry: Registry) -> AsyncIterator[TransformersEngine]:
    spec = registry.models["tiny"]
    eng = TransformersEngine(spec.model_path, max_model_len=spec.max_model_len, slots=16)
    await eng.start()
    yield eng
    await eng.close()


async def run(engine: TransformersEngine, adapter: str, prompt: str = PROMPT) -> list[int]:
    ids = engine.encode(
        GenerateRequest(trace_id="t", model_id="tiny", messages=[ChatMessage(role="user", content=prompt)])
    )
    out: list[int] = []
    async for step in engine.generate(ids, GREEDY, adapter):
        out.extend(step.token_ids)
    return out


async def test_requests_with_different_adapters_run_in_one_batch_without_mixing(
    engine: TransformersEngine, adapter_dirs: dict[str, str]
) -> None:
    base_before = await run(engine, "")
    for name, path in adapter_dirs.items():
        await engine.register_adapter(name, path)
    assert engine.adapters() == ["first-style", "second-style"] and engine.has_adapter("first-style")
    alone = {name: await run(engine, name) for name in ("", "first-style", "second-style")}
    assert alone[""] == base_before  # loading adapters leaves the base model's answers alone
    assert len({tuple(v) for v in alone.values()}) == 3  # each adapter really changes the output
    names = ["", "first-style", "second-style"] * 4
    together = await asyncio.gather(*(run(engine, name) for name in names))
    assert together == [alone[name] for name in names]


async def test_registering_an_adapter_again_replaces_its_weights(
    engine: TransformersEngine, adapter_dirs: dict[str, str]
) -> None:
    await engine.register_adapter("swap-me", adapter_dirs["first-style"])
    first = await run(engine, "swap-me")
    await engine.register_adapter("swap-me", adapter_dirs["second-style"])
    assert await run(engine, "swap-me") == await run(engine, "second-style") != first
    await engine.unregister_adapter("swap-me")
    assert not engine.has_adapter("swap-me")


async def test_a_directory_without_an_adapter_is_refused_and_the_engine_keeps_serving(
    engine: TransformersEngine, tmp_path: Path
) -> None:
    with pytest.raises(CyError, match="no LoRA adapter"):
        await engine.register_adapter("broken", str(tmp_path))
    assert not engine.has_adapter("broken")
    assert await run(engine, "") != []
