"""Building blocks for tests: real nats-server, a tiny random-weight model, in-process workers and gateways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from hypercorn.asyncio import serve as hypercorn_serve

from gateway.api_v1.app import create_api_app
from gateway.core import GatewayCore
from gateway.openai.app import create_lite_app
from gateway.server import hypercorn_config
from gateway.settings import GatewaySettings
from infra.nats import free_port, start_nats
from schemas import codec, subjects
from schemas.workers import ModelStatus, ServedModel, WorkerInfo
from services.engine.settings import WorkerSettings
from services.engine.worker import Worker
from services.models.files import ensure_model
from services.models.registry import ModelSpec, Registry, load_registry

API_KEY = "test-api-key"


class NatsServer:
    def __init__(self, root: Path, token: str = "") -> None:
        self.root = root
        self.token = token
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.proc = start_nats(self.root, port=self.port, token=self.token, log_file=self.root / "nats.log")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def real_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, converted once into .data (shared by every test run)."""
    registry = load_registry()
    return ensure_model(registry.models[registry.default])


def build_tiny_model(target: Path) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer and chat template: fast and deterministic."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def make_registry(root: Path, tiny_dir: Path, real_dir: Path) -> Registry:
    path = root / "models.json"
    path.write_text(
        json.dumps(
            {
                "default": "tiny",
                "models": {
                    "tiny": {
                        "name": "Tiny random Llama",
                        "engine": "transformers",
                        "modelPath": str(tiny_dir),
                        "maxModelLen": 256,
                        "dtype": "float32",
                        "capabilities": ["inference", "stream", "training"],
                    },
                    # Same weights, served only by the workers a test starts itself (dispatch tests).
                    "tiny-solo": {
                        "name": "Tiny (per-test workers)",
                        "engine": "transformers",
                        "modelPath": str(tiny_dir),
                        "maxModelLen": 256,
                        "dtype": "float32",
                    },
                    "smollm2-135m-instruct": {
                        "name": "SmolLM2 135M Instruct",
                        "engine": "transformers",
                        "modelPath": str(real_dir),
                        "maxModelLen": 8192,
                        "dtype": "float32",
                    },
                    "unserved": {
                        "name": "Configured but never started",
                        "engine": "transformers",
                        "modelPath": str(root / "nowhere"),
                        "maxModelLen": 512,
                    },
                },
            }
        )
    )
    return load_registry(path)


@contextlib.asynccontextmanager
async def running_worker(nats_url: str, registry: Registry, model_id: str, **overrides: Any) -> AsyncIterator[Worker]:
    settings = WorkerSettings(nats_url=nats_url, model=model_id, **overrides)
    worker = Worker(settings, spec=(model_id, registry.models[model_id]))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


class Gateway:
    """A real hypercorn server for the /api/v1 app (and /v1 when it exists), on free ports."""

    def __init__(self, core: GatewayCore, api_url: str, lite_url: str | None) -> None:
        self.core = core
        self.api_url = api_url
        self.lite_url = lite_url

    def client(self, api_key: str | None = API_KEY, timeout: float = 120) -> httpx.AsyncClient:
        headers = {"X-API-Key": api_key} if api_key else {}
        return httpx.AsyncClient(base_url=self.api_url, headers=headers, timeout=timeout)


@contextlib.asynccontextmanager
async def running_gateway(nats_url: str, registry: Registry, **overrides: Any) -> AsyncIterator[Gateway]:
    overrides.setdefault("api_key", API_KEY)
    settings = GatewaySettings(nats_url=nats_url, port=free_port(), lite_port=free_port(), **overrides)
    core = GatewayCore(settings, registry=registry)
    await core.start()
    stop = asyncio.Event()
    apps: list[tuple[Any, int]] = [(create_api_app(core), settings.port), (create_lite_app(core), settings.lite_port)]
    lite_url = f"http://127.0.0.1:{settings.lite_port}/v1"
    tasks = [
        asyncio.create_task(
            hypercorn_serve(
                app,
                hypercorn_config("127.0.0.1", port),  # type: ignore[arg-type]
                shutdown_trigger=stop.wait,
            )
        )
        for app, port in apps
    ]
    for _, port in apps:
        await _wait_port(port)
    try:
        yield Gateway(core, f"http://127.0.0.1:{settings.port}", lite_url)
    finally:
        core.draining = True
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        await core.close()


async def announce_ghost_worker(
    gw: Gateway, worker_id: str, model_id: str = "unserved", alive_s: int = 60, status: ModelStatus = "ready"
) -> None:
    """Put a worker in the workers bucket that serves `model_id` and stays alive for `alive_s` but never pulls,
    and wait until the gateway sees the model in `status`: when ready, requests for it then wait in the queue."""
    await put_ghost_worker(gw.core.js, worker_id, model_id, alive_s, status)
    await wait_until(lambda: gw.core.workers.model_state(model_id) == status)


async def put_ghost_worker(
    js: Any, worker_id: str, model_id: str = "unserved", alive_s: int = 60, status: ModelStatus = "ready"
) -> None:
    """`announce_ghost_worker` for any gateway (a process too): the announcement only, nobody waits for it."""
    ghost = WorkerInfo(
        worker_id=worker_id,
        engine="transformers",
        device="cpu",
        slots_total=1,
        heartbeat_ms=int(time.time() * 1000) + alive_s * 1000,
        heartbeat_interval=alive_s // 2,
        models=[ServedModel(model_id=model_id, status=status, engine="transformers")],
    )
    kv = await js.key_value(subjects.WORKERS_BUCKET)
    await kv.put(subjects.worker_key(worker_id), codec.encode(ghost))


async def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.02)
    raise TimeoutError(f"port {port} never opened")


async def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(interval)


def parse_sse(body: str) -> list[Any]:
    """SSE body -> list of decoded `data:` payloads ("[DONE]" kept as a string)."""
    events: list[Any] = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def model_spec(registry: Registry, model_id: str) -> ModelSpec:
    return registry.models[model_id]


class WorkerProcess:
    """An engine worker as a real OS process (`python -m services.engine`), for kill/SIGTERM tests."""

    def __init__(self, nats_url: str, registry_file: Path, model_id: str, worker_id: str, **env: str) -> None:
        import os
        import sys

        self.worker_id = worker_id
        full_env = dict(
            os.environ,
            CY_LLM_NATS_URL=nats_url,
            CY_LLM_MODELS_FILE=str(registry_file),
            CY_LLM_MODEL=model_id,
            CY_LLM_WORKER_ID=worker_id,
            **env,
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.engine"], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    async def wait_ready(self, nc: Any, timeout: float = 120) -> None:
        from schemas import codec, subjects

        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                kv = await nc.jetstream().key_value(subjects.WORKERS_BUCKET)
                info = codec.worker_decoder.decode((await kv.get(subjects.worker_key(self.worker_id))).value)
                if info.models[0].status == "ready":
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError("worker never became ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class GatewayProcess:
    """`python -m gateway` as a real OS process (SIGTERM/SIGINT tests), on free ports; stderr goes to a file."""

    def __init__(self, nats_url: str, registry_file: Path, log: Path, **env: str) -> None:
        import os
        import sys

        self.port, self.lite_port = free_port(), free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.lite_url = f"http://127.0.0.1:{self.lite_port}/v1"
        self.log = log
        full_env = dict(
            os.environ,
            CY_LLM_NATS_URL=nats_url,
            CY_LLM_MODELS_FILE=str(registry_file),
            CY_LLM_API_KEY=API_KEY,
            CY_LLM_PORT=str(self.port),
            CY_LLM_LITE_PORT=str(self.lite_port),
            **env,
        )
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway"], env=full_env, stdout=subprocess.DEVNULL, stderr=err
            )

    async def wait_listening(self, timeout: float = 60) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        for port in (self.port, self.lite_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited: {self.stderr()[-2000:]}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise TimeoutError(f"gateway never listened on {port}") from None
                    await asyncio.sleep(0.05)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class PacedEngine:
    """A real engine (the tiny model) that sleeps `pace` seconds before each step: a stream stays in flight
    long enough for a test to break something under it."""

    def __new__(cls, spec: ModelSpec, pace: float, slots: int = 4) -> Any:
        from collections.abc import AsyncIterator as _AsyncIterator

        from schemas.inference import GenerationParams
        from services.engine.base import TokenStep
        from services.engine.engines import build_engine

        inner = build_engine("transformers", spec, slots=slots, device="cpu")
        original = inner.generate

        async def generate(prompt_ids: list[int], params: GenerationParams, adapter: str) -> _AsyncIterator[TokenStep]:
            steps = original(prompt_ids, params, adapter)
            try:
                async for step in steps:
                    await asyncio.sleep(pace)
                    yield step
            finally:
                await steps.aclose()  # type: ignore[attr-defined]

        inner.generate = generate  # type: ignore[method-assign]
        return inner


@contextlib.asynccontextmanager
async def running_paced_worker(
    nats_url: str, registry: Registry, model_id: str, pace: float, **overrides: Any
) -> AsyncIterator[Worker]:
    """`running_worker` whose engine emits one step every `pace` seconds."""
    settings = WorkerSettings(nats_url=nats_url, model=model_id, **overrides)
    spec = registry.models[model_id]
    worker = Worker(settings, engine=PacedEngine(spec, pace, slots=settings.slots), spec=(model_id, spec))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
