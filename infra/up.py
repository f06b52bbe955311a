"""`just up`: the whole stack in the foreground on its embedded defaults.

Starts nats-server (JetStream, store under the data folder), one engine worker for the default model,
one LoRA trainer, and the gateway (/api/v1 on 8080, /v1 on 8000). Creates the API key and the internal NATS token once
(stored under the data folder) when they are not set. Ctrl-C stops everything in order.

It supervises what it started: a worker or trainer that exits is started again after a delay that doubles with each
quick crash (1 s, 2 s, 4 s ... at most 60 s; back to 1 s once a run lasted a minute); losing nats-server or the
gateway stops the whole stack.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.nats import nats_server_binary, start_nats
from infra.shutdown import catch_stop_signals, stop_in_order
from services.models.files import ensure_model
from services.models.registry import load_registry
from services.runtime import data_dir


def load_secret(env: dict[str, str], var: str, path: Path) -> tuple[str, bool]:
    """Value of `var`, else the one stored at `path`, else a new random one stored there."""
    if env.get(var):
        return env[var], False
    if path.exists():
        return path.read_text().strip(), False
    value = secrets.token_urlsafe(32)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value, True


def _wait_ready(url: str, key: str, alive: Callable[[], bool], ready: bytes, timeout: float = 600) -> bool:
    """Poll `url` until its body contains `ready` (False if `alive()` turns False or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            req = urllib.request.Request(url, headers={"X-API-Key": key})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if ready in resp.read():
                    return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


def _say(line: str) -> None:
    print(f"[cy-llm] {line}", file=sys.stderr, flush=True)


@dataclass
class Child:
    """One supervised process. `restart`: start it again when it exits (workers, trainers); otherwise its exit
    stops the stack (nats-server, the gateway)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: int = 0  # quick exits in a row: the exponent of the next delay
    restart_at: float | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    """Starts children and keeps the restartable ones running; `poll()` is called from the main loop."""

    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_s: float = 60.0  # a run this long resets the delay
    log: Callable[[str], None] = _say
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], *, restart: bool) -> Child:
        child = Child(name, argv, env, restart)
        self._spawn(child)
        self.children.append(child)
        return child

    def adopt(self, name: str, proc: subprocess.Popen[bytes]) -> Child:
        """A process started elsewhere (nats-server): watched, never restarted."""
        child = Child(name, [], {}, False, proc, time.monotonic())
        self.children.append(child)
        return child

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, env=child.env)
        child.started_at = time.monotonic()
        child.restart_at = None

    def poll(self) -> Child | None:
        """Restart what is due; returns the first non-restartable child that has exited (the stack must stop)."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self.log(f"restarting {child.name} (restart #{child.restarts})")
                    self._spawn(child)
                continue
            code = child.proc.poll() if child.proc is not None else None
            if code is None:
                continue
            if not child.restart:
                return child
            child.crashes = 1 if now - child.started_at >= self.stable_s else child.crashes + 1
            delay = min(self.backoff_s * 2 ** (child.crashes - 1), self.backoff_max_s)
            child.restart_at = now + delay
            self.log(f"{child.name} exited with code {code}; restarting it in {delay:g}s")
        return None

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The live processes, in start order (for `stop_in_order`)."""
        return [c.proc for c in self.children if c.proc is not None and c.restart_at is None]


def _nth_id(given: str, kind: str, i: int, count: int) -> str:
    """The id of process i of `count`: `<kind>-N`, or the configured id (`<id>-N` when there are several, so that
    no two workers or trainers share one)."""
    if not given:
        return f"{kind}-{i + 1}"
    return given if count == 1 else f"{given}-{i + 1}"


def main() -> int:
    data = data_dir()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    api_key, new_key = load_secret(env, "CY_LLM_API_KEY", data / "api_key")
    token, _ = load_secret(env, "CY_LLM_INTERNAL_TOKEN", data / "internal_token")
    nats_port = int(env.get("CY_LLM_NATS_PORT", "4222"))
    embedded = env.get("CY_LLM_EMBEDDED_NATS", "1") != "0"
    env.update(CY_LLM_API_KEY=api_key, CY_LLM_INTERNAL_TOKEN=token, CY_LLM_DATA_DIR=str(data))
    if embedded:
        env["CY_LLM_NATS_URL"] = f"nats://127.0.0.1:{nats_port}"

    registry = load_registry()
    model = env.get("CY_LLM_MODEL", "default")
    resolved = registry.resolve(model)
    if resolved is None:
        print(f"CY_LLM_MODEL={model!r} is not in {env.get('CY_LLM_MODELS_FILE', 'infra/models.json')}", file=sys.stderr)
        return 2
    print(f"[cy-llm] preparing model {resolved[0]} ...", flush=True)
    ensure_model(resolved[1])

    sup = Supervisor()
    if embedded:
        print(f"[cy-llm] nats-server ({nats_server_binary()}) on 127.0.0.1:{nats_port}", flush=True)
        sup.adopt("nats-server", start_nats(data, port=nats_port, token=token, log_file=data / "nats.log"))
    workers = int(env.get("CY_LLM_WORKERS", "1"))
    for i in range(workers):
        wid = _nth_id(env.get("CY_LLM_WORKER_ID", ""), "worker", i, workers)
        wenv = dict(env, CY_LLM_WORKER_ID=wid)
        sup.start(f"worker {wid}", [sys.executable, "-m", "services.engine"], wenv, restart=True)
    # The trainer idles until a job arrives (LoRA jobs: /api/v1/training/start); CY_LLM_TRAINERS=0 leaves it out.
    trainers = int(env.get("CY_LLM_TRAINERS", "1"))
    for i in range(trainers):
        tid = _nth_id(env.get("CY_LLM_TRAINER_ID", ""), "trainer", i, trainers)
        tenv = dict(env, CY_LLM_TRAINER_ID=tid)
        sup.start(f"trainer {tid}", [sys.executable, "-m", "services.trainer"], tenv, restart=True)
    sup.start("gateway", [sys.executable, "-m", "gateway"], env, restart=False)

    stop = catch_stop_signals()

    port = env.get("CY_LLM_PORT", "8080")
    lite = env.get("CY_LLM_LITE_PORT", "8000")
    host = env.get("CY_LLM_HOST", "127.0.0.1")
    # "ready" means a request succeeds now: the default model is loaded on a worker (with no workers of our
    # own, the gateway answering is all we can wait for: /health itself is 503 until some model is ready).
    url = f"http://{host}:{port}/api/v1/" + (f"models/{resolved[0]}" if workers else "health/live")
    if _wait_ready(url, api_key, lambda: sup.poll() is None, b'"status":"ready"' if workers else b'"status"'):
        print("\n[cy-llm] ready", flush=True)
        print(f"  REST API    http://{host}:{port}/api/v1   (header X-API-Key)", flush=True)
        print(f"  OpenAI API  http://{host}:{lite}/v1", flush=True)
        print(
            f"  API key     {api_key}"
            + (
                "   (new; stored in " + str(data / "api_key") + ")"
                if new_key
                else f"   (from {'CY_LLM_API_KEY' if os.environ.get('CY_LLM_API_KEY') else data / 'api_key'})"
            ),
            flush=True,
        )
        nats_url = env["CY_LLM_NATS_URL"]
        print(f"  NATS        {nats_url}   (publishers: python -m infra.nats mint-publisher NAME)\n", flush=True)
    code = 0
    while not stop.requested:
        lost = sup.poll()
        if lost is not None:
            _say(f"{lost.name} exited; stopping the stack")
            code = 1
            break
        time.sleep(0.5)
    stop_in_order(sup.processes())  # gateway first, nats-server last
    return code


if __name__ == "__main__":
    sys.exit(main())
