"""The peer users would pick instead: `transformers serve --continuous-batching` on the same model folder.

Same prompts (as chat messages through the same chat template), same greedy decoding and output length,
through its OpenAI endpoint `/v1/chat/completions` with `stream: true`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

from infra.bench._children import Lifecycle, die_with_parent, stop_child
from infra.bench._sse import sse_events
from infra.bench.stack import QUIET_ENV, StackError
from infra.bench.workloads import OneRequest, Sample, TokenCounter
from infra.nats import free_port


def missing_requirements() -> list[str]:
    """What `transformers serve` needs beyond our own dependencies (the `transformers[serving]` extra)."""
    return [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]


def serve_binary() -> str:
    candidate = Path(sys.executable).parent / "transformers"
    return str(candidate) if candidate.exists() else shutil.which("transformers") or "transformers"


PAGE_TOKENS = 256  # transformers' default continuous-batching page size


class PeerServer(Lifecycle):
    """`transformers serve --continuous-batching` with a KV cache sized for the benchmark.

    Left to itself on CPU it sizes the paged cache from free RAM (0.9 of it: 10 GB seen on a 24 GB dev
    machine) and its attention-mask buffers from 8192 batch tokens (~2.4 GB). That would starve the other
    processes on a shared machine without making it faster, so the cache holds twice the blocks that the
    largest level needs and a batch step holds at most 2048 tokens (enough to prefill every prompt of a
    32-stream level at once).
    """

    def __init__(
        self, root: Path, model_dir: Path, *, max_streams: int, max_tokens_per_stream: int, env: dict[str, str]
    ) -> None:
        self.env = env
        self.root = root
        self.model_dir = model_dir
        self.num_blocks = 2 * max_streams * -(-max_tokens_per_stream // PAGE_TOKENS)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        return str(self.model_dir)

    def start(self, timeout: float = 300) -> None:
        """Launch and wait for /health. Raises StackError."""
        self.root.mkdir(parents=True, exist_ok=True)
        log_path = self.root / "peer.log"
        cmd = [serve_binary(), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--cb-num-blocks", str(self.num_blocks), "--cb-max-batch-tokens", "2048"]
        started = time.monotonic()
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [*cmd, self.model_name],
                env=dict(os.environ, **QUIET_ENV, **self.env),
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        while time.monotonic() < started + timeout:
            if self.proc.poll() is not None:
                raise StackError(f"transformers serve exited with {self.proc.returncode}", log_path)
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        self.ready_s = time.monotonic() - started
                        return
            except Exception:
                time.sleep(0.2)
        raise StackError(f"transformers serve was not healthy within {timeout:g}s", log_path)

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc, signal.SIGINT)


def peer_request(client: httpx.AsyncClient, server: PeerServer, counter: TokenCounter) -> OneRequest:
    url = f"{server.base_url}/v1/chat/completions"

    async def one(prompt: str, max_new_tokens: int) -> Sample:
        body = {
            "model": server.model_name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = time.monotonic()
        ttft: float | None = None
        text: list[str] = []
        finish: str | None = None
        usage: int | None = None
        async for event in sse_events(client, url, body, {}):
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.monotonic() - sent
                    text.append(content)
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
        return Sample(ttft, time.monotonic() - sent, counter.count("".join(text)), finish, server_tokens=usage)

    return one
