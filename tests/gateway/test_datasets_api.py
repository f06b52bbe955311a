"""/api/v1/datasets through a real HTTP server and nats-server (object store), and training from a dataset id on
a trainer whose datasets and outputs folders are not the gateway's (no shared disk)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.engine.worker import Worker
from services.models.registry import Registry
from services.trainer.worker import DATASETS_CACHE
from services.training.paths import Roots
from tests.helpers import Gateway, NatsServer, running_gateway, wait_until
from tests.trainer.helpers import (
    ANSWER,
    TEACH,
    TEACH_LORA,
    answer_http,
    roots_for,
    running_trainer,
    teach_rows,
    unique,
    varied_rows,
    wait_adapter_listed,
    wait_status_http,
)

BODY_LIMIT = 4096  # every other route
DATASET_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def gateway_roots(tmp_path_factory: pytest.TempPathFactory) -> Roots:
    return roots_for(tmp_path_factory.mktemp("gateway-disk"))


@pytest.fixture(scope="module")
async def gw(
    nats_server: NatsServer, registry: Registry, gateway_roots: Roots, tiny_worker: Worker
) -> AsyncIterator[Gateway]:
    async with running_gateway(
        nats_server.url,
        registry,
        datasets_dir=str(gateway_roots.datasets),
        outputs_dir=str(gateway_roots.outputs),
        max_body_bytes=BODY_LIMIT,
        max_dataset_bytes=DATASET_LIMIT,
    ) as gateway:
        await wait_until(lambda: gateway.core.workers.model_state("tiny") == "ready")
        yield gateway


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


async def upload(client: httpx.AsyncClient, data: bytes, name: str = "") -> httpx.Response:
    params = {"name": name} if name else {}
    return await client.post(
        "/api/v1/datasets", content=data, params=params, headers={"content-type": "application/jsonl"}
    )


async def test_an_uploaded_jsonl_dataset_is_validated_stored_with_its_digest_and_listed(
    client: httpx.AsyncClient,
) -> None:
    data = jsonl(varied_rows(8))
    r = await upload(client, data, "colours.jsonl")
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["id"].startswith("ds-") and created["object"] == "dataset"
    assert created["name"] == "colours.jsonl" and created["format"] == "jsonl"
    assert created["rows"] == 8 and created["bytes"] == len(data)
    assert created["digest"].startswith("SHA-256=") and created["createdAt"].endswith("Z")

    got = await client.get(f"/api/v1/datasets/{created['id']}")
    assert got.status_code == 200 and got.json() == created
    listed = (await client.get("/api/v1/datasets")).json()
    assert created in listed["datasets"] and listed["total"] >= 1


async def test_a_multipart_json_array_upload_is_accepted(client: httpx.AsyncClient) -> None:
    data = json.dumps(teach_rows(3)).encode()
    r = await client.post("/api/v1/datasets", files={"file": ("teach.json", data, "application/json")})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "json" and r.json()["rows"] == 3 and r.json()["name"] == "teach.json"


async def test_a_bad_row_is_a_400_naming_the_row_and_field_and_nothing_is_stored(client: httpx.AsyncClient) -> None:
    before = (await client.get("/api/v1/datasets")).json()["total"]
    rows: list[Any] = [*teach_rows(2), {"instruction": "no answer here"}, *teach_rows(1)]
    r = await upload(client, jsonl(rows), "bad.jsonl")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert "row 3" in error["message"] and "`output`" in error["message"], error
    assert error["details"] == [
        {"type": "invalid_dataset", "field": "file[row 3].output", "description": "row 3, field `output`: is missing"}
    ]
    not_json = await upload(client, b'{"instruction": "a", "output": "b"}\n{oops\n')
    assert not_json.status_code == 400 and "row 2" in not_json.json()["error"]["message"]
    assert (await client.get("/api/v1/datasets")).json()["total"] == before


async def test_bytes_that_are_not_utf8_or_nest_too_deep_are_a_400_not_a_500(client: httpx.AsyncClient) -> None:
    # msgspec raises these two as UnicodeDecodeError / RecursionError, not DecodeError (they answered 500).
    for data, name in [(b'{"instruction": "\xff", "output": "b"}\n', "x.jsonl"), (b"[" * 50_000, "x.json")]:
        r = await upload(client, data, name)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "INVALID_REQUEST" and "not valid JSON" in r.json()["error"]["message"]


async def test_uploads_get_their_own_body_limit_and_past_it_a_413(client: httpx.AsyncClient) -> None:
    row = {"instruction": "Repeat: " + "x" * 200, "output": "x" * 200}
    big = jsonl([row] * ((BODY_LIMIT * 4) // 450))  # past the other routes' limit, under the datasets one
    assert BODY_LIMIT < len(big) < DATASET_LIMIT
    r = await upload(client, big, "big.jsonl")
    assert r.status_code == 201, r.text

    too_big = jsonl([row] * (DATASET_LIMIT // 400))
    r = await upload(client, too_big, "too-big.jsonl")
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "INVALID_REQUEST" and str(DATASET_LIMIT) in r.json()["error"]["message"]
    r = await client.post("/api/v1/datasets", files={"file": ("too-big.jsonl", too_big)})
    assert r.status_code == 413, r.text
    # Other routes keep theirs.
    r = await client.post("/api/v1/inference", json={"modelId": "tiny", "prompt": "x" * (BODY_LIMIT * 2)})
    assert r.status_code == 413 and str(BODY_LIMIT) in r.json()["error"]["message"]


async def test_a_deleted_or_unknown_dataset_is_a_404(client: httpx.AsyncClient) -> None:
    created = (await upload(client, jsonl(teach_rows(2)))).json()
    r = await client.delete(f"/api/v1/datasets/{created['id']}")
    assert r.status_code == 200 and r.json() == {"id": created["id"], "object": "dataset", "deleted": True}
    for verb in ("get", "delete"):
        r = await client.request(verb.upper(), f"/api/v1/datasets/{created['id']}")
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "DATASET_NOT_FOUND"
    assert created["id"] not in [d["id"] for d in (await client.get("/api/v1/datasets")).json()["datasets"]]
    assert (await client.get("/api/v1/datasets/ds-nope")).status_code == 404


async def start_from(client: httpx.AsyncClient, dataset_id: str, **hyper: Any) -> str:
    body = {"baseModel": "tiny", "outputDir": unique("out"), "datasetId": dataset_id, "hyperParams": hyper}
    r = await client.post("/api/v1/training/start", json=body)
    assert r.status_code == 200, r.text
    job_id: str = r.json()["jobId"]
    return job_id


def in_use_by(r: httpx.Response, dataset_id: str, job_id: str, status: str) -> None:
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "RESOURCE_IN_USE" and job_id in error["message"] and dataset_id in error["message"]
    description = f"training job {job_id} ({status}) trains from it"
    assert error["details"] == [{"type": "resource_in_use", "field": "id", "description": description}]


async def test_deleting_a_dataset_that_a_queued_or_paused_job_uses_gets_409_until_the_job_is_cancelled(
    client: httpx.AsyncClient,
) -> None:
    dataset_id = (await upload(client, jsonl(teach_rows(2)))).json()["id"]
    job_id = await start_from(client, dataset_id)  # no trainer runs in this test: the job stays queued
    try:
        in_use_by(await client.delete(f"/api/v1/datasets/{dataset_id}"), dataset_id, job_id, "queued")
        assert (await client.post(f"/api/v1/training/pause/{job_id}")).json()["status"] == "paused"
        in_use_by(await client.delete(f"/api/v1/datasets/{dataset_id}"), dataset_id, job_id, "paused")
        assert (await client.get(f"/api/v1/datasets/{dataset_id}")).status_code == 200
    finally:
        await client.post(f"/api/v1/training/cancel/{job_id}")
    r = await client.delete(f"/api/v1/datasets/{dataset_id}")
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text


async def test_deleting_a_dataset_that_a_running_job_trains_from_gets_409_until_the_job_is_cancelled(
    client: httpx.AsyncClient, nats_server: NatsServer, registry: Registry, tmp_path: Path
) -> None:
    dataset_id = (await upload(client, jsonl(varied_rows(16)))).json()["id"]
    async with running_trainer(nats_server.url, registry, roots_for(tmp_path / "trainer-disk")):
        job_id = await start_from(client, dataset_id, epochs=1000, batchSize=1, maxSeqLength=64)
        await wait_status_http(client, job_id, {"running"})
        in_use_by(await client.delete(f"/api/v1/datasets/{dataset_id}"), dataset_id, job_id, "running")
        assert (await client.post(f"/api/v1/training/cancel/{job_id}")).json()["status"] == "cancelled"
        r = await client.delete(f"/api/v1/datasets/{dataset_id}")
        assert r.status_code == 200, r.text


async def test_training_start_refuses_an_unknown_dataset_id_and_both_sources_at_once(
    client: httpx.AsyncClient,
) -> None:
    body = {"baseModel": "tiny", "outputDir": unique("out"), "datasetId": "ds-" + "0" * 24}
    r = await client.post("/api/v1/training/start", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "DATASET_NOT_FOUND", r.text
    assert r.json()["error"]["details"][0]["field"] == "datasetId"
    r = await client.post("/api/v1/training/start", json={**body, "datasetPath": "a.jsonl"})
    assert r.status_code == 400 and r.json()["error"]["details"][0]["field"] == "datasetId", r.text
    r = await client.post("/api/v1/training/start", json={"baseModel": "tiny", "outputDir": unique("out")})
    assert r.status_code == 400 and r.json()["error"]["details"][0]["field"] == "datasetPath", r.text


async def test_a_trainer_without_the_gateways_disk_trains_from_a_dataset_id(
    client: httpx.AsyncClient,
    nats_server: NatsServer,
    registry: Registry,
    gateway_roots: Roots,
    tmp_path: Path,
) -> None:
    trainer_roots = roots_for(tmp_path / "trainer-disk")
    assert trainer_roots.datasets != gateway_roots.datasets
    dataset = (await upload(client, jsonl(teach_rows()), "password.jsonl")).json()
    name = unique("from-store")
    async with running_trainer(nats_server.url, registry, trainer_roots):
        r = await client.post(
            "/api/v1/training/start",
            json={
                "baseModel": "tiny",
                "outputDir": unique("out"),
                "datasetId": dataset["id"],
                "hyperParams": TEACH,
                "loraConfig": TEACH_LORA,
                "adapterName": name,
            },
        )
        assert r.status_code == 200, r.text
        done = await wait_status_http(client, r.json()["jobId"], {"completed", "failed", "cancelled"})
    assert done["status"] == "completed", done
    assert done["datasetId"] == dataset["id"] and done["datasetPath"] == ""

    copies = list((trainer_roots.datasets / DATASETS_CACHE).iterdir())
    assert [p.name.split("-", 2)[:2] for p in copies] == [["ds", dataset["id"].removeprefix("ds-")]]
    assert copies[0].read_bytes() == jsonl(teach_rows())
    assert not list(gateway_roots.datasets.rglob("*.jsonl"))  # nothing went through the gateway's disk

    await wait_adapter_listed(client, name)
    assert (await answer_http(client, name)).startswith(ANSWER)
