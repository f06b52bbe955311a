"""The documented direct-NATS example publisher works against a live worker."""

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from services.models.registry import Registry
from tests.helpers import NatsServer, running_worker


async def _run_example(env: dict[str, str]) -> tuple[int | None, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "infra.examples.nats_publisher",
        "hello",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_the_example_nats_publisher_streams_a_reply_with_a_minted_credential(
    tmp_path: Path, registry: Registry
) -> None:
    from infra.nats import mint_publisher

    server = NatsServer(tmp_path / "data", token="example-token").start()
    try:
        password = mint_publisher(server.root, "example-svc", "example-token")
        async with running_worker(
            server.url, registry, "tiny-solo", worker_id="example-w", internal_token="example-token"
        ):
            env = dict(
                os.environ,
                CY_LLM_NATS_URL=server.url,
                CY_LLM_MODEL="tiny-solo",
                CY_LLM_NATS_USER="example-svc",
                CY_LLM_NATS_PASSWORD=password,
            )
            code, out, err = await _run_example(env)
        assert code == 0, err
        assert "[worker example-w" in err and out.strip()
    finally:
        server.stop()


async def test_the_example_nats_publisher_streams_a_reply(nats_server: NatsServer, tiny_worker) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, CY_LLM_NATS_URL=nats_server.url, CY_LLM_MODEL="tiny")
    code, out, err = await _run_example(env)
    assert code == 0, err
    assert "[worker tiny-w1" in err
    tokens = re.search(r"\[(stop|length): (\d+) tokens\]", err)
    assert tokens is not None, err
    assert int(tokens.group(2)) > 0 and out.strip(), "the streamed text is printed on stdout"
