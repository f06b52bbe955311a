"""Cache-aware routing with two real workers: a player's turns stay on the worker that holds its conversation,
sessions spread over the workers, and the affinity gives way when that worker is busy or gone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from schemas.inference import GenerateRequest, GenerationParams, Metadata, StreamEnd
from services.engine.worker import Worker
from services.models.registry import Registry
from tests.helpers import Gateway, NatsServer, WorkerProcess, running_gateway, running_worker, wait_until
from tests.nats_client import connect, request

MODEL = "tiny-solo"


def session_of(player: str, tenant: str = "guild") -> str:
    return GenerateRequest(
        trace_id="x", model_id=MODEL, metadata=Metadata(tenant=tenant, player_id=player)
    ).affinity_key()


async def served_by(gw: Gateway, req: GenerateRequest) -> str:
    """Run `req` through the gateway's inference client; the id of the worker that finished it."""
    async with gw.core.inference.open(req) as stream:
        while True:
            reply = await stream.next(30)
            if isinstance(reply, StreamEnd):
                return stream.worker_id
            assert reply is None or reply.__class__.__name__ in ("Accepted", "TokenChunk"), reply


def turn(player: str, text: str, tokens: int = 4) -> GenerateRequest:
    return request(
        MODEL,
        text,
        metadata=Metadata(tenant="guild", player_id=player),
        generation=GenerationParams(temperature=0, max_new_tokens=tokens),
    )


@contextlib.asynccontextmanager
async def two_workers(
    tmp_path: Path, registry: Registry, prefix: str, slots: int, **gateway: Any
) -> AsyncIterator[tuple[Worker, Worker, Gateway]]:
    """A nats-server, workers `<prefix>-a` and `<prefix>-b` of MODEL and a gateway that has seen both alive.
    The affinity wait defaults to 5 s: on a busy CI machine a worker may take a while to pull its hint."""
    gateway.setdefault("affinity_wait", 5)
    server = NatsServer(tmp_path).start()
    try:
        async with (
            running_worker(server.url, registry, MODEL, worker_id=f"{prefix}-a", slots=slots) as a,
            running_worker(server.url, registry, MODEL, worker_id=f"{prefix}-b", slots=slots) as b,
            running_gateway(server.url, registry, **gateway) as gw,
        ):
            await wait_until(lambda: gw.core.workers.is_alive(a.worker_id) and gw.core.workers.is_alive(b.worker_id))
            yield a, b, gw
    finally:
        server.stop()


async def test_each_players_turns_stay_on_one_worker_and_the_players_spread_over_both(
    tmp_path: Path, registry: Registry
) -> None:
    # 8 slots each: never full, so no turn leaves its worker for being busy (another test covers that).
    async with two_workers(tmp_path, registry, "route", slots=8) as (a, b, gw):
        players = [f"p{i}" for i in range(8)]

        async def play(player: str) -> None:
            history = "You are the innkeeper."
            async with gw.client() as client:
                for n in range(3):
                    history += f" Turn {n}: hello from {player}."
                    body = {
                        "modelId": MODEL,
                        "prompt": history,
                        "generation": {"maxNewTokens": 4, "temperature": 0},
                        "metadata": {"tenant": "guild", "playerId": player},
                    }
                    r = await client.post("/api/v1/inference", json=body)
                    assert r.status_code == 200, r.text

        await asyncio.gather(*(play(p) for p in players))

        held = {w.worker_id: set(w.info().sessions) for w in (a, b)}
        for player in players:
            holders = [wid for wid, sessions in held.items() if session_of(player) in sessions]
            assert len(holders) == 1, f"{player}'s turns went to {holders}"
        counts = sorted(len(held[w] & {session_of(p) for p in players}) for w in held)
        assert counts == [4, 4], f"players per worker: {counts}"


async def test_a_session_whose_worker_has_no_free_slot_is_served_by_the_other_worker_at_once(
    tmp_path: Path, registry: Registry
) -> None:
    # Affinity gives way after 50 ms: the tiny model's long answer below lasts ~250 ms.
    async with two_workers(tmp_path, registry, "busy", slots=1, queue_timeout=60, affinity_wait=0.05) as (_, _, gw):
        home = await served_by(gw, turn("hero", "first turn"))
        assert await served_by(gw, turn("hero", "second turn")) == home
        # Another player fills `home`'s only slot with a long answer...
        long = request(MODEL, "a long story", worker_hint=home)
        long.generation = GenerationParams(temperature=0, max_new_tokens=240)
        async with gw.core.inference.open(long) as blocker:
            while blocker.worker_id != home:
                await blocker.next(10)
            # ... so the hero's next turn goes to the other worker rather than wait for it.
            other = await served_by(gw, turn("hero", "third turn"))
        assert other != home


async def test_a_session_whose_worker_died_moves_to_a_live_worker_and_stays_there(
    tmp_path: Path, registry: Registry, registry_file: Path
) -> None:
    server = NatsServer(tmp_path).start()
    nc = await connect(server.url)
    # Named to sort first: a new session goes to the least loaded worker, ties broken by id.
    doomed = WorkerProcess(server.url, registry_file, MODEL, "a-doomed")
    try:
        await doomed.wait_ready(nc)
        async with (
            running_worker(server.url, registry, MODEL, worker_id="z-live", slots=2),
            running_gateway(server.url, registry, queue_timeout=60, affinity_wait=5) as gw,
        ):
            await wait_until(lambda: gw.core.workers.is_alive("a-doomed") and gw.core.workers.is_alive("z-live"))
            assert await served_by(gw, turn("mage", "first turn")) == "a-doomed"
            doomed.proc.kill()
            await wait_until(lambda: not gw.core.workers.is_alive("a-doomed"), timeout=15)
            assert await asyncio.wait_for(served_by(gw, turn("mage", "second turn")), 15) == "z-live"
            assert await served_by(gw, turn("mage", "third turn")) == "z-live"
    finally:
        doomed.stop()
        await nc.close()
        server.stop()


async def test_a_gateway_that_never_saw_the_session_follows_the_workers_advertisement(
    tmp_path: Path, registry: Registry
) -> None:
    """A second gateway (or one restarted) learns where a session lives from the workers' heartbeats."""
    async with two_workers(tmp_path, registry, "adv", slots=2) as (_, _, first):
        # Two sessions, so that one of them lands on each worker.
        homes = {p: await served_by(first, turn(p, "first turn")) for p in ("rogue", "bard")}
        assert set(homes.values()) == {"adv-a", "adv-b"}
        nats_url = first.core.settings.nats_url
        async with running_gateway(nats_url, registry, affinity_wait=5) as second:

            def advertised() -> bool:
                infos = {p: second.core.workers.get(w) for p, w in homes.items()}
                return all(info is not None and session_of(p) in info.sessions for p, info in infos.items())

            await wait_until(advertised)
            for player, home in homes.items():
                assert await served_by(second, turn(player, "second turn")) == home


async def test_the_openai_prompt_cache_key_names_the_session(tmp_path: Path, registry: Registry) -> None:
    async with two_workers(tmp_path, registry, "key", slots=2) as (a, b, gw):
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 3, "prompt_cache_key": "npc-42", "temperature": 0}
        async with httpx.AsyncClient(base_url=gw.lite_url or "", timeout=60) as client:
            for n in range(3):
                body["messages"] = [{"role": "user", "content": f"turn {n}"}]
                r = await client.post("/chat/completions", json=body)
                assert r.status_code == 200, r.text
        key = GenerateRequest(trace_id="x", model_id=MODEL, metadata=Metadata(session_id="npc-42")).affinity_key()
        assert [key in w.info().sessions for w in (a, b)].count(True) == 1
