"""`just chaos`: the fault suite. Starts a stack of its own (nats-server with users, two cpu-openvino workers
with the threads split, the gateway), drives a mixed load through both HTTP APIs and as a direct NATS
publisher, injects one fault per scenario, and prints one table:

    scenario | requests | completed | failed cleanly | lost/hung | recovery s | leaked | jobs lost

- completed: 200 with a finish reason / a StreamEnd; failed cleanly: an error status in the API's envelope, an
  SSE error event, a StreamError, or a refused connection (a gateway that is down); lost/hung: no answer within
  REQUEST_TIMEOUT_S, or a stream cut without an error.
- recovery s: from the fault until a probe request is answered 200 again.
- leaked: open requests the gateway still counts once the load has stopped (early disconnects must leave none).

Exits 1 on any lost/hung request or leak. Scenarios: baseline; clients that leave 0-20 ms after sending; a
publisher flooding a model nobody serves; kill -9 of a worker; kill -9 of a worker's engine process; kill -9 of
nats-server (restarted after 1 s); SIGTERM of the gateway (restarted once it has drained); kill -9 of the trainer
mid-job (another trainer started, as a supervisor would: the job must resume and complete, else "jobs lost").
Not yet: a node of `just cluster` (tests/test_cluster.py covers it in `just test`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats

from infra.bench._children import descendants, die_with_parent, stop_child
from infra.nats import free_port, mint_publisher, start_nats
from schemas import codec, subjects
from schemas.inference import GenerateRequest, GenerationParams, StreamEnd, StreamError
from services.runtime import role_password

REQUEST_TIMEOUT_S = 60.0
PUBLISHER = "chaos"
WORKERS = ("worker-1", "worker-2")
TRAINERS = ("trainer-1", "trainer-2")
MAX_TOKENS = 24


@dataclass
class Tally:
    scenario: str
    requests: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    recovery_s: float | None = None
    leaked: int = 0
    jobs_lost: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: str, detail: str = "") -> None:
        self.requests += 1
        setattr(self, outcome, getattr(self, outcome) + 1)
        if detail:
            self.errors[detail] = self.errors.get(detail, 0) + 1


class ChaosStack:
    """The processes under test, each restartable."""

    def __init__(self, root: Path, model_id: str, threads: int) -> None:
        self.root, self.model_id, self.threads = root, model_id, threads
        self.token, self.api_key = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        self.nats_port, self.http_port, self.lite_port = free_port(), free_port(), free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.password = ""
        self.job_id = ""  # the training job a scenario started, if any

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, CY_LLM_LOG_LEVEL="warning", HF_HUB_DISABLE_PROGRESS_BARS="1")
        env.update(
            CY_LLM_NATS_URL=self.nats_url,
            CY_LLM_INTERNAL_TOKEN=self.token,
            CY_LLM_API_KEY=self.api_key,
            CY_LLM_MODEL=self.model_id,
            CY_LLM_RATE_LIMIT_PER_MINUTE="0",
            CY_LLM_RATE_LIMIT_CONCURRENT="0",
            CY_LLM_METRICS_PORT="0",
            **extra,
        )
        return env

    def start_nats(self) -> None:
        self.procs["nats"] = start_nats(
            self.root / "data", port=self.nats_port, token=self.token, log_file=self.root / "nats.log"
        )

    def start(self, name: str) -> None:
        if name == "nats":
            self.start_nats()
            return
        if name == "gateway":
            env = self._env(
                CY_LLM_PORT=str(self.http_port),
                CY_LLM_LITE_PORT=str(self.lite_port),
                CY_LLM_DATASETS_DIR=str(self.root / "datasets"),
                CY_LLM_OUTPUTS_DIR=str(self.root / "outputs"),
            )
            module = "gateway"
        elif name.startswith("trainer"):
            env = self._env(CY_LLM_TRAINER_ID=name, CY_LLM_DATASETS_DIR=str(self.root / "datasets"))
            env["CY_LLM_OUTPUTS_DIR"] = str(self.root / "outputs")
            module = "services.trainer"
        else:
            env = self._env(
                CY_LLM_WORKER_ID=name, CY_LLM_ENGINE="cpu-openvino", CY_LLM_ENGINE_THREADS=str(self.threads)
            )
            module = "services.engine"
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", module], env=env, stdout=log, stderr=log, preexec_fn=die_with_parent
            )

    def boot(self) -> None:
        (self.root / "data").mkdir(parents=True, mode=0o700, exist_ok=True)
        self.password = mint_publisher(self.root / "data", PUBLISHER, self.token)
        for name in ("nats", *WORKERS, "trainer-1", "gateway"):
            self.start(name)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)

    def stop(self) -> None:
        for name in ("gateway", *WORKERS, *TRAINERS, "nats"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_child(proc, signal.SIGTERM)


class Load:
    """Requests of four kinds, round robin, from `concurrency` loops, until stopped."""

    KINDS = ("rest", "rest-sse", "openai-sse", "nats")

    def __init__(self, stack: ChaosStack, tally: Tally, concurrency: int) -> None:
        self.stack, self.tally, self.concurrency = stack, tally, concurrency
        self.stopping = False
        self.http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, headers={"X-API-Key": stack.api_key})
        self.nc: nats.NATS | None = None
        self.drops = 0  # the publisher's NATS connection drops (replies sent meanwhile are lost)

    async def _dropped(self) -> None:
        self.drops += 1

    async def run(self) -> None:
        self.nc = await nats.connect(
            self.stack.nats_url,
            user=PUBLISHER,
            password=self.stack.password,
            inbox_prefix=subjects.publisher_inbox_prefix(PUBLISHER),
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            error_cb=_quiet,
            disconnected_cb=self._dropped,
        )
        try:
            await asyncio.gather(*(self._loop(i) for i in range(self.concurrency)))
        finally:
            await self.http.aclose()
            await self.nc.close()

    async def _loop(self, i: int) -> None:
        n = i
        while not self.stopping:
            kind = self.KINDS[n % len(self.KINDS)]
            n += 1
            try:
                outcome, detail = await asyncio.wait_for(self._one(kind), REQUEST_TIMEOUT_S)
            except TimeoutError:
                outcome, detail = "lost", f"{kind}: no answer in {REQUEST_TIMEOUT_S:g}s"
            self.tally.add(outcome, detail)

    async def _one(self, kind: str) -> tuple[str, str]:
        prompt = f"Tell me about the number {random.randint(1, 10_000)}."
        try:
            if kind == "rest":
                r = await self.http.post(
                    f"http://127.0.0.1:{self.stack.http_port}/api/v1/inference",
                    json={"modelId": "default", "prompt": prompt, "generation": {"maxNewTokens": MAX_TOKENS}},
                )
                return _judge_json(r)
            if kind == "rest-sse":
                url = f"http://127.0.0.1:{self.stack.http_port}/api/v1/inference/stream"
                return await self._sse(
                    url, {"modelId": "default", "prompt": prompt, "generation": {"maxNewTokens": MAX_TOKENS}}
                )
            if kind == "openai-sse":
                url = f"http://127.0.0.1:{self.stack.lite_port}/v1/chat/completions"
                messages = [{"role": "user", "content": prompt}]
                return await self._sse(
                    url, {"model": "default", "messages": messages, "stream": True, "max_tokens": MAX_TOKENS}
                )
            return await self._nats(prompt)
        except httpx.ConnectError:
            return "failed", f"{kind}: connection refused"
        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
            return "lost", f"{kind}: {type(exc).__name__}"

    async def _sse(self, url: str, body: dict[str, object]) -> tuple[str, str]:
        async with self.http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return _judge_json(r)
            finished = False
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return "failed", f"sse error {event['error'].get('code')}"
                if any(c.get("finish_reason") for c in event.get("choices", [])):
                    finished = True
            return ("completed", "") if finished else ("lost", "stream ended without finish or error")

    async def _nats(self, prompt: str) -> tuple[str, str]:
        assert self.nc is not None
        trace_id = subjects.owned_trace_id(PUBLISHER, uuid.uuid4().hex)
        sub = await self.nc.subscribe(subjects.stream_subject(trace_id))
        request = GenerateRequest(
            trace_id=trace_id,
            model_id=self.stack.model_id,
            prompt=prompt,
            generation=GenerationParams(max_new_tokens=MAX_TOKENS),
            deadline_ms=int((time.time() + 30) * 1000),
        )
        try:
            await self.nc.jetstream().publish(
                subjects.published_subject(PUBLISHER, self.stack.model_id), codec.encode(request), timeout=5
            )
        except Exception as exc:
            await sub.unsubscribe()
            return "failed", f"nats publish refused: {type(exc).__name__}"
        drops = self.drops
        try:
            while True:
                # As docs/nats.md tells publishers: replies are core NATS, so a connection that dropped mid-request
                # may have lost some; give the request up (and retry it) rather than wait for them.
                if self.drops != drops:
                    return "failed", "nats: connection dropped mid-request"
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                reply = codec.reply_decoder.decode(msg.data)
                if isinstance(reply, StreamEnd):
                    return "completed", ""
                if isinstance(reply, StreamError):
                    return "failed", f"nats error {reply.code}"
        except Exception as exc:
            return "lost", f"nats: {type(exc).__name__}"
        finally:
            await sub.unsubscribe()


def _judge_json(r: httpx.Response) -> tuple[str, str]:
    if r.status_code == 200:
        return "completed", ""
    try:
        code = r.json()["error"]["code"]
    except Exception:
        return "lost", f"status {r.status_code} without an error envelope"
    return "failed", f"{r.status_code} {code}"


async def probe_until_ok(stack: ChaosStack, since: float, limit: float = 120.0) -> float | None:
    """Seconds from `since` until a small request is answered 200."""
    async with httpx.AsyncClient(timeout=10, headers={"X-API-Key": stack.api_key}) as http:
        while time.monotonic() - since < limit:
            try:
                r = await http.post(
                    f"http://127.0.0.1:{stack.http_port}/api/v1/inference",
                    json={"modelId": "default", "prompt": "hi", "generation": {"maxNewTokens": 2}},
                )
                if r.status_code == 200:
                    return time.monotonic() - since
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    return None


async def open_requests(stack: ChaosStack) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{stack.http_port}/metrics")).text
    for line in text.splitlines():
        if line.startswith("cy_llm:gateway_open_requests "):
            return int(float(line.split()[1]))
    return -1


async def wait_ready(stack: ChaosStack, timeout: float = 300) -> None:
    """Until both workers say their model is ready (their heartbeats, read as the gateway role) and the
    gateway answers: each scenario starts from a whole stack."""
    deadline = time.monotonic() + timeout
    nc = await nats.connect(
        stack.nats_url, user="gateway", password=role_password(stack.token, "gateway"), error_cb=_quiet
    )
    try:
        while time.monotonic() < deadline:
            if await _workers_ready(nc) and await probe_until_ok(stack, time.monotonic(), limit=5) is not None:
                return
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
    raise TimeoutError(f"the stack was not ready with {WORKERS} workers in {timeout:g}s (logs: {stack.root})")


async def _workers_ready(nc: nats.NATS) -> bool:
    try:
        kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
        for worker_id in WORKERS:
            info = codec.worker_decoder.decode((await kv.get(subjects.worker_key(worker_id))).value or b"")
            if info.models[0].status != "ready" or time.time() - info.heartbeat_ms / 1000 > 3:
                return False
    except Exception:  # bucket or key not there yet, NATS restarting
        return False
    return True


async def _quiet(exc: Exception) -> None:
    """nats-py prints every reconnect attempt's traceback without an error callback; the faults cause them."""


# --- faults ------------------------------------------------------------------------------------------------
# A fault returns the monotonic time it struck when that is not its call (it waited for a moment first).
Fault = Callable[[ChaosStack], Awaitable[float | None]]


async def no_fault(stack: ChaosStack) -> float | None:
    return None


async def early_disconnects(stack: ChaosStack) -> float | None:
    body = json.dumps({"modelId": "default", "prompt": "go on", "generation": {"maxNewTokens": 200}}).encode()
    for path in ("/api/v1/inference/stream", "/api/v1/inference"):
        for delay_ms in range(0, 21, 2):
            _, writer = await asyncio.open_connection("127.0.0.1", stack.http_port)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: {stack.api_key}\r\n"
            )
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            await asyncio.sleep(delay_ms / 1000)
            writer.close()
    return None


async def publisher_flood(stack: ChaosStack) -> float | None:
    nc = await nats.connect(
        stack.nats_url,
        user=PUBLISHER,
        password=stack.password,
        inbox_prefix=subjects.publisher_inbox_prefix(PUBLISHER),
        error_cb=_quiet,
    )
    try:
        for i in range(999):
            request = GenerateRequest(trace_id=f"{PUBLISHER}.flood-{i}", model_id="nomodel", prompt="x")
            try:
                await nc.jetstream().publish(subjects.published_subject(PUBLISHER, "nomodel"), codec.encode(request))
            except Exception:  # past its pending bound: refused to it alone
                pass
    finally:
        await nc.close()
    return None


async def kill_worker(stack: ChaosStack) -> float | None:
    stack.kill("worker-1")
    return None


async def kill_engine_child(stack: ChaosStack) -> float | None:
    children = descendants(stack.procs["worker-1"].pid)
    if not children:
        raise RuntimeError("worker-1 has no engine process")
    children[0].kill()
    return None


async def kill_nats(stack: ChaosStack) -> float | None:
    stack.kill("nats")
    stack.procs["nats"].wait(10)
    await asyncio.sleep(1.0)
    stack.start("nats")
    return None


async def sigterm_gateway(stack: ChaosStack) -> float | None:
    stack.kill("gateway", signal.SIGTERM)
    await asyncio.to_thread(stack.procs["gateway"].wait, 60)
    stack.start("gateway")
    return None


async def kill_trainer_mid_job(stack: ChaosStack) -> float | None:
    """Start a small LoRA job, SIGKILL its trainer once it has trained a step, start another trainer (as a
    supervisor would); the job must resume from its checkpoint and complete. Sets `stack.job_lost`."""
    rows = [{"instruction": f"Count to {i}.", "output": " ".join(str(k) for k in range(1, i + 2))} for i in range(24)]
    api = f"http://127.0.0.1:{stack.http_port}/api/v1"
    async with httpx.AsyncClient(timeout=30, headers={"X-API-Key": stack.api_key}) as http:
        data = "\n".join(json.dumps(r) for r in rows).encode()
        upload = await http.post(
            f"{api}/datasets?name=count.jsonl", content=data, headers={"Content-Type": "application/jsonl"}
        )
        upload.raise_for_status()
        hyper = {"epochs": 1, "batchSize": 2, "maxSeqLength": 64, "saveSteps": 2, "evalSteps": 100, "loraRank": 4}
        started = await http.post(
            f"{api}/training/start",
            json={
                "baseModel": "default",
                "outputDir": f"chaos-{uuid.uuid4().hex[:8]}",
                "datasetId": upload.json()["id"],
                "hyperParams": hyper,
            },
        )
        started.raise_for_status()
        job = started.json()["jobId"]
        stack.job_id = job
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = (await http.get(f"{api}/training/status/{job}")).json()
            if status["status"] == "running" and (status.get("progress") or {}).get("currentStep", 0) >= 3:
                break
            await asyncio.sleep(0.5)
    struck = time.monotonic()
    stack.kill("trainer-1")
    stack.procs["trainer-1"].wait(10)
    stack.start("trainer-2")
    return struck


async def job_outcome(stack: ChaosStack, timeout: float = 600) -> bool:
    """Whether the scenario's training job completed."""
    api = f"http://127.0.0.1:{stack.http_port}/api/v1"
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=30, headers={"X-API-Key": stack.api_key}) as http:
        while time.monotonic() < deadline:
            status = (await http.get(f"{api}/training/status/{stack.job_id}")).json()["status"]
            if status in ("completed", "failed", "cancelled"):
                return status == "completed"
            await asyncio.sleep(1.0)
    return False


SCENARIOS: list[tuple[str, Fault]] = [
    ("baseline", no_fault),
    ("clients leave 0-20 ms after sending", early_disconnects),
    ("publisher floods an unserved model", publisher_flood),
    ("kill -9 one of two workers", kill_worker),
    ("kill -9 a worker's engine process", kill_engine_child),
    ("kill -9 nats-server (back after 1 s)", kill_nats),
    ("SIGTERM the gateway (restarted)", sigterm_gateway),
    ("kill -9 the trainer mid-job (another takes over)", kill_trainer_mid_job),
]


async def run_scenario(stack: ChaosStack, name: str, fault: Fault, seconds: float, concurrency: int) -> Tally:
    tally = Tally(name)
    load = Load(stack, tally, concurrency)
    runner = asyncio.create_task(load.run())
    await asyncio.sleep(seconds / 3)
    faulted = time.monotonic()
    faulted = await fault(stack) or faulted
    tally.recovery_s = await probe_until_ok(stack, faulted) if fault is not no_fault else 0.0
    await asyncio.sleep(seconds * 2 / 3)
    load.stopping = True
    await runner
    await asyncio.sleep(1.0)  # cancels and cleanups settle
    tally.leaked = max(await open_requests(stack), 0)
    if stack.job_id:
        tally.jobs_lost = 0 if await job_outcome(stack) else 1
        stack.job_id = ""
    if name.startswith("kill -9 one of two workers"):
        stack.start("worker-1")
    await wait_ready(stack)
    return tally


def render(tallies: list[Tally]) -> str:
    header = "| scenario | requests | completed | failed cleanly | lost/hung | recovery s | leaked | jobs lost |"
    rows = [header, "|---" * 8 + "|"]
    for t in tallies:
        recovery = "-" if t.recovery_s is None else f"{t.recovery_s:.1f}"
        rows.append(
            f"| {t.scenario} | {t.requests} | {t.completed} | {t.failed} | {t.lost} | {recovery} | {t.leaked}"
            f" | {t.jobs_lost} |"
        )
    notes = [
        f"- {t.scenario}: " + ", ".join(f"{k} x{v}" for k, v in sorted(t.errors.items())) for t in tallies if t.errors
    ]
    return "\n".join(rows + (["", *notes] if notes else []))


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="cy-chaos-"))
    stack = ChaosStack(root, args.model, threads=max(1, (os.cpu_count() or 2) // 2))
    stack.boot()
    tallies: list[Tally] = []
    try:
        await wait_ready(stack)
        for name, fault in SCENARIOS:
            if args.only and args.only not in name:
                continue
            print(f"chaos: {name} ...", file=sys.stderr, flush=True)
            tallies.append(await run_scenario(stack, name, fault, args.seconds, args.concurrency))
    finally:
        stack.stop()
    print(render(tallies))
    print(f"\n(logs: {root})")
    bad = any(t.lost or t.leaked or t.jobs_lost or t.recovery_s is None for t in tallies)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="just chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="load per scenario (the fault at a third)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
