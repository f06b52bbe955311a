"""DELETE /api/v1/adapters/{name} refused while something holds the adapter: a job that trains into its name, or
(without `?force=true`) live workers that serve it. Real nats-server, gateway and tiny worker; no trainer runs,
so a started job stays queued."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js.object_store import ObjectStore

from schemas import codec, subjects
from schemas.training import AdapterRecord
from services import adapter_store, jetstream
from services.engine.worker import Worker
from services.models.registry import Registry
from services.training.paths import Roots
from tests.gateway.test_openai_models import build_lora
from tests.helpers import Gateway, NatsServer, wait_until
from tests.trainer.helpers import unique, varied_rows, write_jsonl


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.drain()


async def register(js: Any, name: str, folder: Path) -> AdapterRecord:
    """Upload `folder` and record it as trained adapter `name` of the tiny model (as a finished job does)."""
    store: ObjectStore = await jetstream.ensure_adapter_files(js)
    kv = await jetstream.ensure_adapters_bucket(js)
    obj, digest, size = await adapter_store.upload_adapter(store, "tiny", name, folder)
    record = AdapterRecord(model_id="tiny", name=name, path="/elsewhere", object=obj, digest=digest, size=size)
    await kv.put(subjects.adapter_key("tiny", name), codec.encode(record))
    return record


def refusal(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 409, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == "RESOURCE_IN_USE"
    return error


async def test_deleting_an_adapter_that_a_queued_job_trains_into_gets_409_even_forced_until_the_job_is_cancelled(
    client: httpx.AsyncClient, js: Any, roots: Roots, tmp_path: Path
) -> None:
    name = unique("retrained")
    unusable = tmp_path / "adapter"  # workers fail to load it, so only the job holds the name
    unusable.mkdir()
    (unusable / "adapter_config.json").write_text("{}")
    await register(js, name, unusable)
    body = {"baseModel": "tiny", "outputDir": unique("out"), "datasetPath": write_jsonl(roots, varied_rows(4))}
    r = await client.post("/api/v1/training/start", json={**body, "adapterName": name})
    assert r.status_code == 200, r.text
    job_id = r.json()["jobId"]
    try:
        for query in ("", "?force=true"):
            error = refusal(await client.delete(f"/api/v1/adapters/{name}{query}"))
            assert job_id in error["message"] and name in error["message"]
            description = f"training job {job_id} (queued) trains into it"
            assert error["details"] == [{"type": "resource_in_use", "field": "name", "description": description}]
    finally:
        await client.post(f"/api/v1/training/cancel/{job_id}")
    r = await client.delete(f"/api/v1/adapters/{name}")
    assert r.status_code == 200 and r.json()["deleted"][0]["modelId"] == "tiny", r.text


async def test_deleting_an_adapter_that_a_worker_serves_gets_409_unless_forced(
    gw: Gateway, client: httpx.AsyncClient, js: Any, registry: Registry, tiny_worker: Worker, tmp_path: Path
) -> None:
    name = unique("served")
    await register(js, name, build_lora(Path(registry.models["tiny"].model_path), tmp_path / "lora"))
    await wait_until(lambda: name in gw.core.workers.adapters("tiny"))

    error = refusal(await client.delete(f"/api/v1/adapters/{name}"))
    assert "force=true" in error["message"]
    serving = {"type": "resource_in_use", "field": "name", "description": "worker tiny-w1 serves it with tiny"}
    assert serving in error["details"]
    assert tiny_worker.engine.has_adapter(name)

    r = await client.delete(f"/api/v1/adapters/{name}?force=true")
    assert r.status_code == 200, r.text
    await wait_until(lambda: not tiny_worker.engine.has_adapter(name), timeout=10)
