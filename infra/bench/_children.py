"""Children that die with the benchmark: a killed or crashed run must not leave workers eating the CPU."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from typing import Any, Self

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for Popen: the child gets SIGTERM when the thread that started it goes away (Linux).

    Start children from the main thread: with PDEATHSIG, "parent" means the creating thread.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def exit_on_sigterm() -> None:
    """SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so every `finally` stops its processes."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def descendants(pid: int) -> list[Any]:
    """The live children of `pid`, theirs, and so on, as psutil.Process objects ([] without psutil).

    vLLM's worker runs its model in an engine process of its own: its CPU time belongs to the worker,
    and it must not outlive a worker that had to be killed.
    """
    try:
        import psutil

        return list(psutil.Process(pid).children(recursive=True))
    except Exception:  # no psutil, or the process is gone
        return []


def reap(procs: list[Any], timeout: float = 10.0) -> None:
    """SIGTERM the given psutil processes that still run, SIGKILL those left after `timeout`."""
    if not procs:
        return
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def stop_child(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Send `sig` to `proc` if it still runs and give it `timeout` seconds to exit (drain); SIGKILL it after that."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Lifecycle:
    """A context manager made of `start()` and `stop()`: a start that fails part-way stops what it had started."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
