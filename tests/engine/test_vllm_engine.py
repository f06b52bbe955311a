"""The vLLM engine on its own: the synchronous `cuda-vllm` driver, and auto-tuning against real vLLM.

Each test starts and closes its own engine, one at a time (vLLM is heavy on a 2-core host).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from structlog.testing import capture_logs

from schemas import codec, subjects
from schemas.errors import CyError, ErrorCode
from schemas.inference import ChatMessage, GenerateRequest, GenerationParams
from services.engine.settings import WorkerSettings
from services.engine.vllm_engine import VllmEngine, VllmSettings
from services.engine.worker import Worker
from tests.engine.vllm_support import MODEL_ID, VLLM, engine_name, vllm_registry
from tests.helpers import NatsServer

pytestmark = VLLM

GREEDY = GenerationParams(temperature=0, max_new_tokens=24)


def prompt_ids(engine: VllmEngine, text: str) -> list[int]:
    return engine.encode(
        GenerateRequest(trace_id="t", model_id=MODEL_ID, messages=[ChatMessage(role="user", content=text)])
    )


async def steps(engine: VllmEngine, ids: list[int], params: GenerationParams) -> list[tuple[list[int], str | None]]:
    return [(s.token_ids, s.finish_reason) async for s in engine.generate(ids, params, "")]


async def test_the_sync_engine_streams_token_by_token_the_same_greedy_tokens_as_the_async_one() -> None:
    spec = vllm_registry({}).models[MODEL_ID]
    outputs = {}
    for mode in ("async", "sync"):
        engine = VllmEngine(engine_name(), spec, slots=4, mode=mode)
        await engine.start()
        try:
            ids = prompt_ids(engine, "Name three colours.")
            outputs[mode] = await steps(engine, ids, GREEDY)
            if mode == "sync":
                # Real streaming: many small deltas, not one finished text.
                assert len(outputs[mode]) >= 10 and all(len(t) <= 2 for t, _ in outputs[mode])
                # Closing early aborts inside vLLM.
                gen = engine.generate(ids, GenerationParams(temperature=0, max_new_tokens=500), "")
                await gen.__anext__()
                await gen.aclose()  # type: ignore[attr-defined]
                for _ in range(100):
                    if engine.unfinished_requests() == 0:
                        break
                    await asyncio.sleep(0.02)
                assert engine.unfinished_requests() == 0
        finally:
            await engine.close()
    flat = {mode: [t for ts, _ in out for t in ts] for mode, out in outputs.items()}
    assert flat["sync"] == flat["async"]
    assert outputs["sync"][-1][1] == outputs["async"][-1][1] in ("stop", "length")


async def test_a_kv_cache_larger_than_the_machine_steps_down_the_ladder_and_starts() -> None:
    spec = vllm_registry({}).models[MODEL_ID]
    settings = VllmSettings(vllm_kv_cache_gb=4096)  # 4 TiB
    engine = VllmEngine(engine_name(), spec, slots=4, settings=settings)
    with capture_logs() as logs:
        await engine.start()
    try:
        events = [e for e in logs if e["event"].startswith("auto_tuning")]
        assert events[0]["event"] == "auto_tuning_skip" and events[0]["kv_cache_gib"] == 4096
        assert events[-1]["event"] == "auto_tuning_try"
        assert engine.rung is not None and engine.rung.kv_cache_bytes is not None
        assert engine.rung.kv_cache_bytes < 4096 << 30
        assert engine.slots == engine.rung.max_num_seqs < 4
        out = await steps(engine, prompt_ids(engine, "Hello"), GenerationParams(temperature=0, max_new_tokens=5))
        assert sum(len(t) for t, _ in out) == 5
    finally:
        await engine.close()


async def test_with_tuning_off_the_worker_fails_fast_with_insufficient_resources(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CY_LLM_ALLOW_AUTO_TUNING", "false")
    monkeypatch.setenv("CY_LLM_VLLM_KV_CACHE_GB", "4096")
    worker_id = f"vllm-off-{uuid.uuid4().hex[:6]}"
    settings = WorkerSettings(nats_url=nats_server.url, model=MODEL_ID, engine=engine_name(), worker_id=worker_id)
    worker = Worker(settings, spec=(MODEL_ID, vllm_registry({}).models[MODEL_ID]))
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(CyError) as err:
            await worker.start()
        assert err.value.code == ErrorCode.INSUFFICIENT_RESOURCES
        assert "CY_LLM_ALLOW_AUTO_TUNING" in err.value.body.message
        assert asyncio.get_running_loop().time() - started < 20  # no engine start was attempted
        assert worker.nc is not None
        kv = await worker.nc.jetstream().key_value(subjects.WORKERS_BUCKET)
        info = codec.worker_decoder.decode((await kv.get(subjects.worker_key(worker_id))).value)
        assert info.models[0].status == "failed" and "4096" in info.models[0].error
    finally:
        await worker.stop()


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CY_LLM_ALLOW_AUTO_TUNING", "false")
    monkeypatch.setenv("CY_LLM_VLLM_MAX_LORA_RANK", "16")
    engine = VllmEngine(engine_name(), vllm_registry({}).models[MODEL_ID], slots=2)
    assert engine.settings.allow_auto_tuning is False and engine.settings.vllm_max_lora_rank == 16
