"""What every process shares: settings from the environment, logging, the NATS connection, task ownership."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import structlog
from nats.aio.client import Client as NATS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT / ".data"
ENV_PREFIX = "CY_LLM_"

S = TypeVar("S")


class SettingsError(SystemExit):
    """A bad environment variable: the process stops at start with a message naming it."""


def load_settings(cls: type[S], *, prefix: str = ENV_PREFIX, env: dict[str, str] | None = None) -> S:
    """Read a frozen msgspec Struct from `<prefix><FIELD>` variables (strings converted and validated).

    Raises SettingsError naming the variable when a value does not fit its type or range.
    """
    source: Mapping[str, str] = os.environ if env is None else env
    raw: dict[str, Any] = {}
    for name in cls.__struct_fields__:  # type: ignore[attr-defined]
        var = f"{prefix}{name.upper()}"
        if source.get(var):
            raw[name] = source[var]
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        path = str(exc).rsplit("at `$.", 1)
        field = path[1].rstrip("`") if len(path) == 2 else "?"
        raise SettingsError(f"Config error in {prefix}{field.upper()}: {exc}") from exc


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    # The services' shared secret: each service connects as its role's NATS user with a password derived
    # from it (`role_password`); nats.conf holds only bcrypt hashes of those passwords.
    internal_token: str = ""
    # An explicit NATS user instead (a minted publisher credential, or a user managed outside this repo).
    nats_user: str = ""
    nats_password: str = ""


def role_password(token: str, role: str) -> str:
    """The NATS password of a service role (gateway, worker, trainer), derived from the internal token."""
    return hmac.new(token.encode(), f"cy-llm nats user {role}".encode(), hashlib.sha256).hexdigest()


def data_dir() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}DATA_DIR") or DEFAULT_DATA_DIR).resolve()


def configure_logging(service: str, level: str | None = None) -> None:
    """structlog once per process: console on a TTY, JSON lines otherwise; contextvars bound per request."""
    level_name = (level or os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "info")).upper()
    # Tracebacks without frame locals: structlog's and rich's defaults render them, and a request
    # handler's locals hold the request body (prompt text would land in the logs).
    output: list[Any]
    if sys.stderr.isatty():
        tracebacks = structlog.dev.RichTracebackFormatter(show_locals=False)
        output = [structlog.dev.ConsoleRenderer(exception_formatter=tracebacks)]
    else:
        tracebacks_as_dicts = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        output = [structlog.processors.ExceptionRenderer(tracebacks_as_dicts), structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *output,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level_name]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


async def connect_nats(
    settings: NatsSettings,
    name: str,
    *,
    role: str = "",
    reconnected: Callable[[], Awaitable[None]] | None = None,
    disconnected: Callable[[], None] | None = None,
    **kwargs: Any,
) -> NATS:
    """Connect with endless reconnects (a restarting nats-server must not kill a service).

    `reconnected` runs in a background task after every reconnect: the server may have come back without
    what the service created (a memory-backed bucket, or its whole store), so services re-create their
    streams, buckets and consumers there. A newer reconnect cancels a hook still running from an older one.
    `disconnected` is called at once when the connection drops (replies in flight may be lost from now on).

    Credentials: `nats_user`/`nats_password` when set; else, with an internal token, the NATS user `role`
    with its derived password (a `role` of "" sends the token itself, for servers configured with it).
    """
    log = structlog.get_logger()
    hook: asyncio.Task[None] | None = None

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", error=repr(exc))

    async def on_disconnect() -> None:
        log.warning("nats_disconnected")
        if disconnected is not None:
            disconnected()

    async def run_hook(hook_fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await hook_fn()
            log.info("nats_resources_reensured")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("nats_reensure_failed", error=repr(exc))

    async def on_reconnect() -> None:
        nonlocal hook
        log.info("nats_reconnected")
        if reconnected is None:
            return
        # Not awaited here: nats-py awaits this callback inside its reconnect loop.
        if hook is not None and not hook.done():
            hook.cancel()
        hook = asyncio.create_task(run_hook(reconnected), name=f"{name}-reensure")

    # A comma-separated list names several cluster nodes; the first is this service's home node,
    # the others are failover targets.
    servers = [url.strip() for url in settings.nats_url.split(",") if url.strip()]
    return await nats.connect(
        servers=servers,
        dont_randomize=True,
        name=name,
        **_credentials(settings, role),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **kwargs,
    )


def _credentials(settings: NatsSettings, role: str) -> dict[str, str]:
    if settings.nats_user:
        return {"user": settings.nats_user, "password": settings.nats_password}
    if settings.internal_token and role:
        return {"user": role, "password": role_password(settings.internal_token, role)}
    if settings.internal_token:
        return {"token": settings.internal_token}
    return {}


async def close_nats(nc: NATS | None, timeout: float = 5.0) -> None:
    """Drain a connection (pending publishes flushed, subscriptions finished) within `timeout`; when the
    server is gone or draining takes too long, close it instead. Never raises: shutdown must finish."""
    if nc is None or nc.is_closed:
        return
    try:
        if nc.is_connected:
            await asyncio.wait_for(nc.drain(), timeout)
            return
    except Exception as exc:
        structlog.get_logger().warning("nats_drain_failed", error=repr(exc))
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except Exception as exc:
        structlog.get_logger().warning("nats_close_failed", error=repr(exc))


class Tasks:
    """Strong references to background tasks; `close()` waits with a timeout, then cancels."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            structlog.get_logger().error("background_task_failed", task=task.get_name(), error=repr(task.exception()))

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        if pending:  # say what held the close up (a drain that runs out is a bug to find, not only a wait)
            structlog.get_logger().warning(
                "tasks_cancelled_at_close",
                timeout=timeout,
                tasks=[f"{t.get_name()}: {_where(t)}" for t in pending],
            )
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _where(task: asyncio.Task[Any]) -> str:
    """The innermost line `task` waits at."""
    frames = task.get_stack()
    if not frames:
        return "?"
    code = frames[-1].f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{frames[-1].f_lineno} in {code.co_name}"


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task has been asked to cancel. A cancel can be swallowed: Python 3.11's
    `asyncio.wait_for` returns the result when the awaited future completes in the same loop turn as the
    cancel (nats-py's request/publish-ack and `next_msg` use it), and the task goes on as if nothing came.
    A loop that keeps awaiting after such calls (a reply stream, a queue wait) checks here each turn, so a
    client that left stops its request within one turn (measured: 1 in 3 early disconnects was lost)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


_shielded: set[asyncio.Task[Any]] = set()


async def shielded(coro: Coroutine[Any, Any, S]) -> S:
    """Run `coro` to its end even when the caller is cancelled (a client that leaves cancels its handler, and
    the cleanup it triggers must still reach NATS): the task is held here until done, then its result (or
    the caller's CancelledError) is returned."""
    task = asyncio.create_task(coro)
    _shielded.add(task)
    task.add_done_callback(_shielded.discard)
    return await asyncio.shield(task)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def _quiet_cancelled_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: a connection task that a server cancelled is one log line, not a traceback.

    Python 3.11.7's asyncio.streams calls `task.exception()` on the task of a closed connection without
    checking `task.cancelled()` first (CPython gh-113538, fixed by checking it), so every connection that a
    server cancels at shutdown (hypercorn does, for those still open after its graceful timeout) printed a
    CancelledError traceback. Everything else goes to the default handler."""
    if isinstance(context.get("exception"), asyncio.CancelledError) and "StreamReaderProtocol" in str(
        context.get("message", "")
    ):
        structlog.get_logger().info("connection_cancelled_at_shutdown")
        return
    loop.default_exception_handler(context)


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` until it returns; SIGINT/SIGTERM set `stop` so it can drain and exit cleanly."""

    async def _runner() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        asyncio.get_running_loop().set_exception_handler(_quiet_cancelled_connections)
        await main(stop)

    asyncio.run(_runner())
