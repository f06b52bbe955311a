"""Machine facts for the report, and how much CPU other processes took while we measured.

The dev machines are shared: other engineers' test runs land on the same two cores. The report cannot
prevent that, so it measures it: `CpuWatch` compares the machine's busy CPU time with the CPU time of
this process and its (reaped) children; the difference is what everything else used.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from infra.bench._children import descendants
from services.runtime import REPO_ROOT


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_facts() -> dict[str, Any]:
    import torch

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "openvino": _version("openvino"),
        "openvino_genai": _version("openvino-genai"),
        "nats_py": _version("nats-py"),
        "quart": _version("quart"),
        "hypercorn": _version("hypercorn"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_at_start": os.getloadavg(),
    }


def _busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds since boot (all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """CPU seconds used by other processes between start() and stop() (Linux; None elsewhere)."""

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    def start(self) -> None:
        try:
            self._start = (time.monotonic(), _busy_cpu_s(), _own_cpu_s())
        except (OSError, ValueError, IndexError):
            self._start = None

    def stop(self) -> dict[str, float] | None:
        if self._start is None:
            return None
        wall0, busy0, own0 = self._start
        wall, busy, own = time.monotonic() - wall0, _busy_cpu_s() - busy0, _own_cpu_s() - own0
        return {
            "wall_s": round(wall, 1),
            "machine_busy_cpu_s": round(busy, 1),
            "bench_cpu_s": round(own, 1),
            "other_cpu_s": round(max(busy - own, 0.0), 1),
            "other_cores_avg": round(max(busy - own, 0.0) / wall, 2) if wall > 0 else 0.0,
        }


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one live process (Linux /proc; None when it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tree_cpu_s(pid: int) -> float | None:
    """`process_cpu_s` of a process plus that of its live descendants (vLLM's worker runs its model in an
    engine process of its own). None when the process itself cannot be read."""
    own = process_cpu_s(pid)
    if own is None:
        return None
    return own + sum(cpu for child in descendants(pid) if (cpu := process_cpu_s(child.pid)) is not None)


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ProcessCpu:
    """CPU seconds each named process (with its children) used between `start()` and `stop()`; "client" is
    this process.

    `ours` are all the benchmark's processes (idle targets included); whatever else the machine did in the
    meantime is reported as `other_cores`: the average number of cores other users took during the level.
    `idle_targets_cores` is what our other targets, idle while this one runs, took on average.
    """

    def __init__(self, pids: dict[str, int], ours: list[int]) -> None:
        self.pids = pids
        self.ours = ours
        self._start: dict[str, float | None] = {}
        self._ours0: dict[int, float] = {}
        self._busy0 = 0.0
        self._wall0 = 0.0

    def _ours_cpu(self) -> dict[int, float]:
        return {pid: cpu for pid in self.ours if (cpu := tree_cpu_s(pid)) is not None}

    def start(self) -> None:
        self._start = {name: tree_cpu_s(pid) for name, pid in self.pids.items()}
        self._start["client"] = self_cpu_s()
        self._wall0, self._busy0, self._ours0 = time.monotonic(), _busy_cpu_s(), self._ours_cpu()

    def stop(self) -> dict[str, float]:
        client = self_cpu_s()
        now: dict[str, float | None] = {name: tree_cpu_s(pid) for name, pid in self.pids.items()}
        now["client"] = client
        out = {
            name: round(end - begin, 2)
            for name, end in now.items()
            if end is not None and (begin := self._start.get(name)) is not None
        }
        wall = time.monotonic() - self._wall0
        ours1 = self._ours_cpu()
        used = {pid: ours1[pid] - begin for pid, begin in self._ours0.items() if pid in ours1}
        other = (_busy_cpu_s() - self._busy0) - sum(used.values()) - (client - (self._start["client"] or 0.0))
        idle = sum(cpu for pid, cpu in used.items() if pid not in set(self.pids.values()))
        out["other_cores"] = round(max(other, 0.0) / wall, 2) if wall > 0 else 0.0
        out["idle_targets_cores"] = round(max(idle, 0.0) / wall, 2) if wall > 0 else 0.0
        return out


class OtherProcesses:
    """Samples every process every few seconds; names the ones outside this benchmark that used the most CPU.

    Processes that start and end between two samples are missed; `CpuWatch` still counts their CPU.
    """

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self._seen: dict[int, tuple[str, float, float]] = {}  # pid -> (label, first cpu, last cpu)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-load-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        first = True
        while not self._stop.is_set():
            ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
            for proc in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
                info = proc.info
                if info["pid"] in ours or info["cpu_times"] is None:
                    continue
                cpu = info["cpu_times"].user + info["cpu_times"].system
                label, begin, _ = self._seen.get(info["pid"], ("", cpu if first else 0.0, 0.0))
                label = label or " ".join(info["cmdline"] or [info["name"] or "?"])[:90]
                self._seen[info["pid"]] = (label, begin, cpu)
            first = False
            self._stop.wait(self.interval)

    def stop(self, top: int = 5) -> list[tuple[str, float]]:
        self._stop.set()
        self._thread.join(10)
        used = sorted(((label, last - begin) for label, begin, last in self._seen.values()), key=lambda x: -x[1])
        return [(label, round(cpu, 1)) for label, cpu in used[:top] if cpu >= 1.0]
