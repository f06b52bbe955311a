"""The documented direct-NATS example publisher works against a live worker."""

import asyncio
import os
import re
import subprocess
import sys

from tests.helpers import NatsServer


async def test_the_example_nats_publisher_streams_a_reply(nats_server: NatsServer, tiny_worker) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, CY_LLM_NATS_URL=nats_server.url, CY_LLM_MODEL="tiny")
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
    assert proc.returncode == 0, err.decode()
    assert "[worker tiny-w1" in err.decode()
    tokens = re.search(r"\[(stop|length): (\d+) tokens\]", err.decode())
    assert tokens is not None, err.decode()
    assert int(tokens.group(2)) > 0 and out.strip(), "the streamed text is printed on stdout"
