"""Several LoRA adapters on one transformers engine: chosen per request, batched together without mixing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest
import torch

from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode
from schemas.inference import ChatMessage, GenerateRequest, GenerationParams
from schemas.training import AdapterRecord
from services import jetstream
from services.engine.adapters import AdapterSync
from services.engine.transformers_engine import TransformersEngine
from services.models.registry import Registry
from tests.helpers import NatsServer, wait_until
from tests.trainer.helpers import unique

GREEDY = GenerationParams(temperature=0, max_new_tokens=12)
PROMPT = "Tell me a story about a cat."


def make_adapter(model_path: str, target: Path, seed: int) -> str:
    """A LoRA adapter with random (non-zero) weights: it changes what the model says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    config = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(target))
    return str(target)


@pytest.fixture(scope="module")
def adapter_dirs(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    path = registry.models["tiny"].model_path
    return {name: make_adapter(path, root / name, seed) for name, seed in (("first-style", 1), ("second-style", 2))}


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


class RecordingEngine:
    """Stands in for an engine: the sync logic is the subject here (the real engine is tested above)."""

    name = "recording"

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[str] = []

    async def register_adapter(self, name: str, path: str) -> None:
        if path.endswith("broken"):
            raise CyError(ErrorCode.INVALID_REQUEST, "no LoRA adapter")
        self.loaded[name] = path
        self.calls.append(f"+{name}")

    async def unregister_adapter(self, name: str) -> None:
        self.loaded.pop(name, None)
        self.calls.append(f"-{name}")


async def test_workers_follow_the_adapters_bucket_live_and_a_resync_catches_what_they_missed(
    nats_server: NatsServer,
) -> None:
    model = unique("stub-model")
    nc = await nats.connect(nats_server.url)
    try:
        kv = await jetstream.ensure_adapters_bucket(nc.jetstream())

        async def put(name: str, path: str) -> None:
            record = AdapterRecord(model_id=model, name=name, path=path, created_ms=time.time_ns())
            await kv.put(subjects.adapter_key(model, name), codec.encode(record))

        await put("early-one", "/a/early")
        await put("bad-one", "/a/broken")
        engine = RecordingEngine()
        changes: list[int] = []

        async def on_change() -> None:
            changes.append(1)

        sync = AdapterSync(nc, engine, model, {"from-registry": "/a/static"}, on_change, resync_s=3600)
        await sync.start()
        # Registry adapters and those already registered load at start; a broken one is skipped.
        assert engine.loaded == {"from-registry": "/a/static", "early-one": "/a/early"}

        await put("late-one", "/a/late")
        await wait_until(lambda: "late-one" in engine.loaded)
        await kv.delete(subjects.adapter_key(model, "early-one"))
        await wait_until(lambda: "early-one" not in engine.loaded)
        assert len(changes) == 2

        await sync.stop()  # missed while "disconnected": a new one and a deletion
        await put("missed-one", "/a/missed")
        await kv.delete(subjects.adapter_key(model, "late-one"))
        assert await sync.resync()
        assert engine.loaded == {"from-registry": "/a/static", "missed-one": "/a/missed"}
        assert not await sync.resync()  # nothing changed since: nothing reloaded
    finally:
        await nc.drain()
