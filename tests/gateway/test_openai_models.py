"""GET /v1/models (base models and LoRA adapters with `parent`), adapters selected by `model` name, and the
/health and /ready probes."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import openai
import pytest
from openai import AsyncOpenAI

from services.models.registry import Registry
from tests.gateway.conftest import sdk
from tests.helpers import Gateway, NatsServer, running_gateway, running_worker, wait_until

HELLO = [{"role": "user", "content": "Hello there"}]


def with_adapters(registry: Registry, model_id: str, adapters: dict[str, str], **changes: str) -> Registry:
    models = dict(registry.models)
    models[model_id] = msgspec.structs.replace(models[model_id], adapters=adapters)
    return msgspec.structs.replace(registry, models=models, **changes)


async def test_models_lists_every_configured_model_in_openai_shape(aclient: AsyncOpenAI) -> None:
    page = await aclient.models.list()
    models = {m.id: m for m in page.data}
    assert {"default", "tiny", "smollm2-135m-instruct", "unserved"} <= set(models)
    assert (models["default"].model_extra or {})["root"] == "tiny"  # the alias names its model
    tiny = models["tiny"]
    assert tiny.object == "model" and tiny.owned_by == "cy-llm" and isinstance(tiny.created, int)
    extra = tiny.model_extra or {}
    assert extra["parent"] is None and extra["root"] == "tiny" and extra["max_model_len"] == 256
    assert extra["status"] == "ready" and (models["unserved"].model_extra or {})["status"] == "unavailable"


async def test_a_model_is_retrievable_by_id_or_as_default_and_a_missing_one_is_not_found(
    aclient: AsyncOpenAI,
) -> None:
    assert (await aclient.models.retrieve("tiny")).id == "tiny"
    default = await aclient.models.retrieve("default")
    assert default.id == "default" and (default.model_extra or {})["root"] == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        await aclient.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


async def test_registry_adapters_are_listed_with_their_parent_and_requests_naming_one_carry_it_to_the_worker(
    nats_server: NatsServer, registry: Registry, gateway: Gateway
) -> None:
    """The adapter exists only in this gateway's registry, not on the running worker: the worker's own
    "not available" answer shows the request reached it as (model "tiny", adapter "tiny-pirate")."""
    reg = with_adapters(registry, "tiny", {"tiny-pirate": "/nowhere/tiny-pirate"})
    async with running_gateway(nats_server.url, reg) as gw:
        await wait_until(lambda: gw.core.workers.model_state("tiny") == "ready")
        client = sdk(gw.lite_url)
        try:
            models = {m.id: m for m in (await client.models.list()).data}
            assert (models["tiny-pirate"].model_extra or {})["parent"] == "tiny"
            assert (await client.models.retrieve("tiny-pirate")).id == "tiny-pirate"
            with pytest.raises(openai.NotFoundError) as err:
                await client.chat.completions.create(model="tiny-pirate", messages=HELLO, max_tokens=3)  # type: ignore[arg-type]
            assert "tiny-pirate" in err.value.message and "'tiny'" in err.value.message
        finally:
            await client.close()


def build_lora(base: Path, target: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights for the tiny model: it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (target / "adapter_config.json").exists():
        return target
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(target)
    return target


async def test_an_adapter_is_used_when_named_as_the_model(
    nats_server: NatsServer, registry: Registry, gateway: Gateway, tmp_path: Path
) -> None:
    pytest.importorskip("services.engine.adapters", reason="LoRA serving on the transformers engine not landed yet")
    adapter = build_lora(Path(registry.models["tiny-solo"].model_path), tmp_path / "tiny-pirate")
    reg = with_adapters(registry, "tiny-solo", {"tiny-pirate": str(adapter)})
    async with (
        running_worker(nats_server.url, reg, "tiny-solo", worker_id="solo-lora-w1", slots=2),
        running_gateway(nats_server.url, reg) as gw,
    ):
        await wait_until(lambda: gw.core.workers.model_state("tiny-solo") == "ready")
        client = sdk(gw.lite_url)
        try:
            listed = {m.id: m.model_extra or {} for m in (await client.models.list()).data}
            assert listed["tiny-pirate"]["parent"] == "tiny-solo"
            params = {"messages": HELLO, "temperature": 0, "max_tokens": 12}
            base = await client.chat.completions.create(model="tiny-solo", **params)  # type: ignore[call-overload]
            lora = await client.chat.completions.create(model="tiny-pirate", **params)  # type: ignore[call-overload]
            assert lora.model == "tiny-pirate"
            assert lora.choices[0].message.content != base.choices[0].message.content
            stream = await client.chat.completions.create(model="tiny-pirate", stream=True, **params)  # type: ignore[call-overload]
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert streamed == lora.choices[0].message.content
        finally:
            await client.close()


async def test_health_is_ok_and_ready_says_whether_the_default_model_has_a_worker(
    nats_server: NatsServer, registry: Registry, gateway: Gateway
) -> None:
    base = (gateway.lite_url or "").removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        health = await http.get("/health")
        ready = await http.get("/ready")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": "tiny", "model_status": "ready"}
    async with running_gateway(nats_server.url, msgspec.structs.replace(registry, default="unserved")) as gw:
        async with httpx.AsyncClient(base_url=(gw.lite_url or "").removesuffix("/v1"), timeout=30) as http:
            not_ready = await http.get("/ready")
            health = await http.get("/health")
    assert not_ready.status_code == 503
    assert not_ready.json() == {"status": "not_ready", "model": "unserved", "model_status": "unavailable"}
    assert health.json() == {"status": "ok"}
