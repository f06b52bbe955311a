"""How the foreground launchers (`just up`, `just cluster`) stop: Ctrl-C or SIGTERM only asks, and their main loop
then stops the processes they started, last started first."""

from __future__ import annotations

import signal
import subprocess


class StopRequest:
    """Whether SIGINT or SIGTERM has arrived. A plain flag, not a `threading.Event`: a signal handler runs
    between two bytecodes of the main thread and must not wait for a lock that thread may hold."""

    def __init__(self) -> None:
        self.requested = False


def catch_stop_signals() -> StopRequest:
    """Install SIGINT and SIGTERM handlers that only set the returned flag, for a main loop to poll."""
    stop = StopRequest()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def stop_in_order(procs: list[subprocess.Popen[bytes]], timeout: float = 40) -> None:
    """SIGTERM each process, last started first, waiting up to `timeout` for it to drain, then kill."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
