"""py-spy profiles of the gateway and the worker while one concurrency level runs (`--profile`).

Each profile is py-spy's raw "collapsed stacks" text (loadable in speedscope or flamegraph.pl), and
`summarize` ranks functions by the share of samples they appear in (inclusive) and sit on top of (self),
which is what the report quotes as evidence for the bottleneck.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from infra.bench._children import die_with_parent


def py_spy_binary() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


class Profiler:
    """`with Profiler({"gateway": pid, ...}, folder):` samples every named process for the block's duration.

    `gil` names processes to sample a second time with `--gil` (only the thread holding the GIL is
    recorded): in the worker that shows whether the event loop (NATS, detokenizing) gets the GIL at all
    while the batcher thread runs the model.
    """

    def __init__(self, pids: dict[str, int], folder: Path, rate: int = 100, gil: dict[str, int] | None = None) -> None:
        self.pids = pids
        self.gil = gil or {}
        self.folder = folder
        self.rate = rate
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.files: dict[str, Path] = {}

    def __enter__(self) -> Profiler:
        binary = py_spy_binary()
        if binary is None:
            print("  (py-spy not found: no profile taken)", file=sys.stderr)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, pid, extra in [
            *((n, p, []) for n, p in self.pids.items()),
            *((n, p, ["--gil"]) for n, p in self.gil.items()),
        ]:
            out = self.folder / f"{name}.pyspy.txt"
            cmd = [binary, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", *extra]
            cmd += ["--threads", "--nonblocking", "-o", str(out)]
            with open(self.folder / f"{name}.pyspy.log", "wb") as log:
                self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, preexec_fn=die_with_parent)
            self.files[name] = out
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summaries(self, top: int = 12) -> dict[str, Any]:
        return {name: summarize(path, top) for name, path in self.files.items() if path.exists()}


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: one entry per function, whatever the line."""
    if " (" in frame and frame.endswith(")"):
        func, where = frame[:-1].split(" (", 1)
        return f"{func} ({Path(where.rsplit(':', 1)[0]).name})"
    return frame


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    """Samples per thread, and the functions with the largest inclusive and self shares of all samples."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        if frames[0].startswith(("thread ", "process ")):
            threads[frames[0]] += count
            frames = frames[1:] or frames
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count
        own[_short(frames[-1])] += count
    share = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "threads_pct": {t: share(n) for t, n in threads.most_common()},
        "inclusive_pct": [(f, share(n)) for f, n in inclusive.most_common(top)],
        "self_pct": [(f, share(n)) for f, n in own.most_common(top)],
        "file": str(path),
    }
