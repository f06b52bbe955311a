"""`just up` supervises its children: a crashed worker or trainer comes back, losing the gateway or
nats-server stops the stack."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from infra.up import Supervisor, _nth_id
from schemas import codec, subjects
from tests.helpers import NatsServer
from tests.nats_client import connect, request, submit


async def _ready_pid(nc, worker_id: str, timeout: float = 120) -> int:  # type: ignore[no-untyped-def]
    """The pid the worker announces once its model is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
            info = codec.worker_decoder.decode((await kv.get(subjects.worker_key(worker_id))).value)
            if info.models[0].status == "ready" and not info.draining:
                return info.pid
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{worker_id} never became ready")


async def _supervise(sup: Supervisor, stop: asyncio.Event) -> None:
    while not stop.is_set():
        assert sup.poll() is None
        await asyncio.sleep(0.1)


async def test_a_worker_killed_under_the_supervisor_comes_back_and_serves_again(
    nats_server: NatsServer, registry_file: Path
) -> None:
    nc = await connect(nats_server.url)
    lines: list[str] = []
    sup = Supervisor(backoff_s=0.2, log=lines.append)
    env = dict(
        os.environ,
        CY_LLM_NATS_URL=nats_server.url,
        CY_LLM_MODELS_FILE=str(registry_file),
        CY_LLM_MODEL="tiny-solo",
        CY_LLM_WORKER_ID="supervised-1",
    )
    child = sup.start("worker supervised-1", [sys.executable, "-m", "services.engine"], env, restart=True)
    stop = asyncio.Event()
    loop = asyncio.create_task(_supervise(sup, stop))
    try:
        first_pid = await _ready_pid(nc, "supervised-1")
        assert child.proc is not None and first_pid == child.proc.pid
        child.proc.kill()  # SIGKILL
        # The worker's old announcement stays until its TTL: wait for the new process's own.
        deadline = time.monotonic() + 120
        while (pid := await _ready_pid(nc, "supervised-1")) == first_pid:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        assert pid == child.proc.pid and child.restarts == 1
        assert any("supervised-1 exited with code -9" in line for line in lines), lines
        got = await submit(nc, request("tiny-solo", "back?"), subjects.hinted_subject("tiny-solo", "supervised-1"))
        await asyncio.wait_for(got.done.wait(), 60)
        assert got.worker_id == "supervised-1"
    finally:
        stop.set()
        await loop
        for proc in sup.processes():
            proc.kill()
            proc.wait(10)
        await nc.drain()


def test_a_crashing_worker_is_restarted_with_exponential_backoff() -> None:
    lines: list[str] = []
    sup = Supervisor(backoff_s=0.1, backoff_max_s=0.4, log=lines.append)
    sup.start("worker crashy", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), restart=True)
    deadline = time.monotonic() + 20
    while sum("restarting it in" in line for line in lines) < 5:
        assert sup.poll() is None, "a restartable child must not stop the stack"
        assert time.monotonic() < deadline, lines
        time.sleep(0.02)
    delays = [line.rsplit(" ", 1)[-1] for line in lines if "restarting it in" in line]
    assert delays == ["0.1s", "0.2s", "0.4s", "0.4s", "0.4s"], lines
    assert "exited with code 3" in lines[0]


def test_losing_the_gateway_or_nats_server_stops_the_stack() -> None:
    import subprocess

    sup = Supervisor()
    nats = sup.adopt("nats-server", subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    gateway = sup.start("gateway", [sys.executable, "-c", "raise SystemExit(1)"], dict(os.environ), restart=False)
    try:
        assert gateway.proc is not None
        gateway.proc.wait(10)
        lost = sup.poll()
        assert lost is gateway
    finally:
        assert nats.proc is not None
        nats.proc.kill()
        nats.proc.wait(10)
    assert sup.poll() in (gateway, nats)


def test_several_workers_under_one_configured_id_each_get_their_own() -> None:
    assert [_nth_id("", "worker", i, 2) for i in range(2)] == ["worker-1", "worker-2"]
    assert [_nth_id("gpu-box", "worker", i, 3) for i in range(3)] == ["gpu-box-1", "gpu-box-2", "gpu-box-3"]
    assert _nth_id("gpu-box", "worker", 0, 1) == "gpu-box"  # one process keeps the id as configured
