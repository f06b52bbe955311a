"""Children that die with the benchmark: a killed or crashed run must not leave workers eating the CPU."""

from __future__ import annotations

import ctypes
import signal
import sys

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
