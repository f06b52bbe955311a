"""NATS service discovery: workers and trainers answer $SRV.PING / INFO / STATS as NATS micro services,
with their real endpoints, also under the per-role NATS users."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from schemas import codec, subjects
from services.discovery import TRAINING_SERVICE, WORKER_SERVICE
from services.engine.worker import Worker
from services.models.registry import Registry
from services.runtime import NatsSettings, connect_nats
from tests.helpers import NatsServer, running_worker
from tests.trainer.helpers import roots_for, running_trainer

TOKEN = "discovery-test-token"


async def gather(nc: NATS, subject: str, wait: float = 0.5) -> list[dict[str, Any]]:
    """Every answer to a request many services reply to (the micro protocol's discovery pattern)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    answers: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + wait
    while (left := until - loop.time()) > 0:
        try:
            answers.append(json.loads((await sub.next_msg(timeout=left)).data))
        except (TimeoutError, nats.errors.TimeoutError):
            break
    await sub.unsubscribe()
    return answers


async def test_ping_lists_the_worker_and_training_services_and_info_reaches_the_worker(
    nats_server: NatsServer, registry: Registry, tiny_worker: Worker, tmp_path: Path
) -> None:
    async with running_trainer(nats_server.url, registry, roots_for(tmp_path), trainer_id="disc-t1"):
        nc = await nats.connect(nats_server.url)
        try:
            pings = await gather(nc, "$SRV.PING")
            by_name = {(p["name"], p["metadata"].get("worker_id") or p["metadata"].get("trainer_id")) for p in pings}
            assert (WORKER_SERVICE, "tiny-w1") in by_name and (TRAINING_SERVICE, "disc-t1") in by_name, pings
            assert all(p["type"] == "io.nats.micro.v1.ping_response" for p in pings)

            infos = [
                i for i in await gather(nc, f"$SRV.INFO.{WORKER_SERVICE}") if i["metadata"]["worker_id"] == "tiny-w1"
            ]
            assert len(infos) == 1
            info = infos[0]
            assert info["metadata"]["model_id"] == "tiny"
            assert info["metadata"]["metrics_url"].endswith("/metrics")
            (endpoint,) = info["endpoints"]
            assert endpoint["name"] == "info"
            # The endpoint is real: it answers with the worker's WorkerInfo.
            reply = await nc.request(endpoint["subject"], b"", timeout=5)
            worker_info = codec.worker_decoder.decode(reply.data)
            assert worker_info.worker_id == "tiny-w1" and worker_info.slots_total == 8

            # The trainer's endpoints are the training API verbs (JobService); STATS counts the requests they answered.
            (training,) = [
                i for i in await gather(nc, f"$SRV.INFO.{TRAINING_SERVICE}") if i["metadata"]["trainer_id"] == "disc-t1"
            ]
            verbs = {e["name"]: e for e in training["endpoints"]}
            assert set(verbs) == {"start", "status", "cancel", "pause", "resume", "list"}
            assert verbs["list"]["subject"] == subjects.training_api_subject("list")
            assert verbs["list"]["queue_group"] == subjects.TRAINING_API_GROUP
            assert (await nc.request(subjects.training_api_subject("list"), b"\x80", timeout=10)).data
            stats = await gather(nc, f"$SRV.STATS.{TRAINING_SERVICE}")
            assert sum(e["num_requests"] for s in stats for e in s["endpoints"] if e["name"] == "list") >= 1
        finally:
            await nc.close()


@pytest.fixture
def secured(tmp_path: Path) -> Any:
    server = NatsServer(tmp_path / "secured", token=TOKEN).start()
    yield server
    server.stop()


async def test_services_register_under_their_role_users_and_the_gateway_user_can_discover_them(
    secured: NatsServer, registry: Registry, tmp_path: Path
) -> None:
    async with (
        running_worker(secured.url, registry, "tiny-solo", worker_id="disc-w2", internal_token=TOKEN, metrics_port=0),
        running_trainer(secured.url, registry, roots_for(tmp_path), trainer_id="disc-t2", internal_token=TOKEN),
    ):
        nc = await connect_nats(NatsSettings(nats_url=secured.url, internal_token=TOKEN), "t", role="gateway")
        try:
            names = {p["name"] for p in await gather(nc, "$SRV.PING")}
            assert {WORKER_SERVICE, TRAINING_SERVICE} <= names
            (info,) = await gather(nc, f"$SRV.INFO.{WORKER_SERVICE}")
            assert info["metadata"]["metrics_url"] == ""  # metrics_port=0: off
            assert (await nc.request(info["endpoints"][0]["subject"], b"", timeout=5)).data
        finally:
            await nc.close()
