"""NATS users per role: the services keep working with only their subjects, a minted publisher credential
runs its own requests and cannot read anyone else's, and every secret-bearing file is 0600."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from infra.nats import AUTH_FILE, CONFIG_FILE, PUBLISHERS_FILE, mint_publisher
from schemas import codec, subjects
from schemas.inference import GenerateRequest, GenerationParams, StreamEnd, StreamError
from services.models.registry import Registry
from services.runtime import NatsSettings, connect_nats
from tests.helpers import NatsServer, running_gateway, running_worker, wait_until
from tests.trainer.helpers import roots_for, running_trainer

TOKEN = "test-internal-token"


@pytest.fixture
def secured(tmp_path: Path) -> NatsServer:  # type: ignore[misc]
    server = NatsServer(tmp_path / "data", token=TOKEN).start()
    yield server
    server.stop()


async def _publisher(server: NatsServer, name: str, password: str, errors: list[Exception]) -> NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    return await nats.connect(
        server.url,
        user=name,
        password=password,
        inbox_prefix=subjects.publisher_inbox_prefix(name),
        error_cb=on_error,
    )


async def test_a_publisher_credential_runs_its_own_request_and_cannot_read_other_streams(
    secured: NatsServer, registry: Registry
) -> None:
    password = mint_publisher(secured.root, "alice", TOKEN)
    async with running_worker(secured.url, registry, "tiny-solo", worker_id="auth-w1", internal_token=TOKEN):
        errors: list[Exception] = []
        nc = await _publisher(secured, "alice", password, errors)
        try:
            # Someone else's reply stream (a gateway's single-token trace id, another publisher's): refused.
            await nc.subscribe(subjects.stream_subject("gen-someone-else"))
            await nc.subscribe(subjects.stream_subject("bob.t1"))
            await nc.subscribe(subjects.INBOX_ALL)
            await nc.flush()
            await asyncio.sleep(0.3)
            denied = " ".join(str(e).lower() for e in errors)
            assert denied.count("permissions violation") == 3, errors
            assert "gen-someone-else" in denied and "bob.t1" in denied and "_inbox.>" in denied
            # Its own request, end to end.
            errors.clear()
            trace_id = subjects.owned_trace_id("alice", uuid.uuid4().hex)
            replies = await nc.subscribe(subjects.stream_subject(trace_id))
            req = GenerateRequest(
                trace_id=trace_id,
                model_id="tiny-solo",
                prompt="hi",
                generation=GenerationParams(temperature=0, max_new_tokens=4),
            )
            await nc.jetstream().publish(subjects.published_subject("alice", "tiny-solo"), codec.encode(req))
            last = None
            while not isinstance(last, StreamEnd):
                last = codec.reply_decoder.decode((await replies.next_msg(timeout=30)).data)
                assert not isinstance(last, StreamError), last
            # Cancelling someone else's trace is refused too.
            await nc.publish(subjects.cancel_subject("gen-someone-else"), b"")
            await nc.flush()
            await asyncio.sleep(0.3)
            assert any("permissions violation" in str(e).lower() for e in errors), errors
        finally:
            await nc.close()


async def test_a_publisher_cannot_make_chunks_appear_on_another_publishers_or_the_gateways_subjects(
    secured: NatsServer, registry: Registry
) -> None:
    alice_password = mint_publisher(secured.root, "alice", TOKEN)
    bob_password = mint_publisher(secured.root, "bob", TOKEN)
    async with (
        running_worker(secured.url, registry, "tiny-solo", worker_id="auth-w2", internal_token=TOKEN),
        running_gateway(secured.url, registry, internal_token=TOKEN) as gw,
    ):
        errors: list[Exception] = []
        alice = await _publisher(secured, "alice", alice_password, errors)
        bob = await _publisher(secured, "bob", bob_password, errors)
        try:
            # What bob and the gateway would receive on the subjects alice aims at.
            seen: list[bytes] = []

            async def collect(msg: nats.aio.msg.Msg) -> None:
                seen.append(msg.data)

            await bob.subscribe(subjects.stream_subject("bob.t2"), cb=collect)
            await bob.subscribe(subjects.stream_subject("bob.t4"), cb=collect)
            await gw.core.nc.subscribe(subjects.stream_subject("gen-owned-by-the-gateway"), cb=collect)
            await bob.flush()
            await gw.core.nc.flush()
            refusals = [
                await alice.subscribe(subjects.stream_subject(subjects.owned_trace_id("alice", local)))
                for local in ("t2", "gen-owned-by-the-gateway")
            ]
            for trace_id in ("bob.t2", "gen-owned-by-the-gateway"):
                req = GenerateRequest(trace_id=trace_id, model_id="tiny-solo", prompt="hi")
                await alice.jetstream().publish(subjects.published_subject("alice", "tiny-solo"), codec.encode(req))
            for sub in refusals:  # each refused, to alice, under her own name
                reply = codec.reply_decoder.decode((await sub.next_msg(timeout=30)).data)
                assert isinstance(reply, StreamError) and reply.code == "FORBIDDEN", reply
                assert "alice.<id>" in reply.message
            # An unreadable request naming bob's trace: the refusal goes to alice too.
            unreadable = await alice.subscribe(subjects.stream_subject("alice.t4"))
            junk = msgspec.msgpack.encode({"trace_id": "bob.t4", "model_id": 5})
            await alice.jetstream().publish(subjects.published_subject("alice", "tiny-solo"), junk)
            reply = codec.reply_decoder.decode((await unreadable.next_msg(timeout=30)).data)
            assert isinstance(reply, StreamError) and reply.code == "INVALID_REQUEST", reply
            await asyncio.sleep(0.3)
            assert seen == []
            # Nor can she publish where the workers would take the services' word for the owner, or bob's.
            errors.clear()
            req = GenerateRequest(trace_id="bob.t3", model_id="tiny-solo", prompt="hi")
            for subject in (subjects.generate_subject("tiny-solo"), subjects.published_subject("bob", "tiny-solo")):
                await alice.publish(subject, codec.encode(req))
            await alice.flush()
            await asyncio.sleep(0.3)
            denied = " ".join(str(e).lower() for e in errors)
            assert denied.count("permissions violation") == 2, errors
            assert seen == []
        finally:
            await alice.close()
            await bob.close()


async def test_the_gateway_worker_and_trainer_work_with_their_role_users(
    secured: NatsServer, registry: Registry, tmp_path: Path
) -> None:
    async with (
        running_worker(secured.url, registry, "tiny-solo", worker_id="auth-w2", internal_token=TOKEN),
        running_trainer(secured.url, registry, roots_for(tmp_path), trainer_id="auth-t1", internal_token=TOKEN),
        running_gateway(secured.url, registry, internal_token=TOKEN) as gw,
    ):
        await wait_until(lambda: gw.core.workers.model_state("tiny-solo") == "ready")
        async with gw.client() as client:
            r = await client.post(
                "/api/v1/inference", json={"modelId": "tiny-solo", "prompt": "hi", "generation": {"maxNewTokens": 3}}
            )
            assert r.status_code == 200, r.text
            r = await client.get("/api/v1/training/list")
            assert r.status_code == 200, r.text
        # The trainer answers the training API verbs (JobService; here asked with the gateway's user).
        nc = await connect_nats(NatsSettings(nats_url=secured.url, internal_token=TOKEN), "t", role="gateway")
        try:
            answer = await nc.request(subjects.training_api_subject("list"), b"\x80", timeout=10)
            assert answer.data
        finally:
            await nc.close()
    # A bare token no longer opens the server.
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises its own error types for a refused auth
        await nats.connect(secured.url, token=TOKEN, max_reconnect_attempts=0, allow_reconnect=False)


def test_the_config_and_credential_files_are_private(secured: NatsServer) -> None:
    mint_publisher(secured.root, "carol", TOKEN)
    root = secured.root
    for name in (CONFIG_FILE, AUTH_FILE, PUBLISHERS_FILE):
        mode = stat.S_IMODE((root / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {oct(mode)}"
    assert stat.S_IMODE((root / "nats").stat().st_mode) == 0o700
    for name in (CONFIG_FILE, AUTH_FILE, PUBLISHERS_FILE):
        assert TOKEN not in (root / name).read_text()
    assert "$2" in (root / AUTH_FILE).read_text(), "passwords are stored as bcrypt hashes"


def test_mint_publisher_prints_a_credential_and_writes_it_privately(secured: NatsServer) -> None:
    env = dict(os.environ, CY_LLM_DATA_DIR=str(secured.root), CY_LLM_INTERNAL_TOKEN=TOKEN)
    out = subprocess.run(
        [sys.executable, "-m", "infra.nats", "mint-publisher", "dave"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "CY_LLM_NATS_USER=dave" in out.stdout and "CY_LLM_NATS_PASSWORD=" in out.stdout
    creds = secured.root / "publisher-dave.env"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    bad = subprocess.run(
        [sys.executable, "-m", "infra.nats", "mint-publisher", "no.dots"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
