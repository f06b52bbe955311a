"""What every process shares: the logging configuration (run in a child process, since structlog's
configuration is process-wide and its loggers cache it)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from services.runtime import REPO_ROOT

# A request handler that fails while its locals hold the prompt, logged the way the services log errors.
FAILING_HANDLER = """
import structlog
from services.runtime import configure_logging

configure_logging("test")

def handle(body):
    prompt = body["prompt"]
    raise ValueError("boom")

try:
    handle({"prompt": %r})
except ValueError:
    structlog.get_logger().exception("unhandled_error")
"""


def run_logging(secret: str, tty: bool) -> str:
    """stderr of a process that logs an exception whose frames hold `secret` (on a terminal when `tty`)."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO_ROOT)}
    code = FAILING_HANDLER % secret
    if not tty:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60, cwd=REPO_ROOT)
        return done.stderr.decode()
    parent, child = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=child, cwd=REPO_ROOT)
        os.close(child)
        chunks = []
        while True:
            try:
                chunk = os.read(parent, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(60)
    finally:
        os.close(parent)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("tty", [False, True], ids=["json", "console"])
def test_logged_exceptions_show_the_traceback_but_not_the_frame_locals_that_hold_request_text(tty: bool) -> None:
    secret = f"SECRET-PROMPT-{uuid.uuid4().hex}"
    out = run_logging(secret, tty)
    assert "unhandled_error" in out and "ValueError" in out and "handle" in out, out
    assert secret not in out, out
