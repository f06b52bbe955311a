"""The project's own engine tests, unchanged, on this device."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infra.gpu import REPO

PYTEST_FILES = ("tests/engine/test_transformers_engine.py", "tests/engine/test_adapters.py")


def pytest_phase(model_dir: Path, root: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run the engine's CPU tests unchanged; their engines use device "auto", which is CUDA where there is
    one. Their registry's default model (whose tokenizer the tests' tiny model takes) is the random one."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    registry = {
        "default": "smol",
        "models": {
            "smol": {"name": "smol", "engine": "transformers", "modelPath": str(model_dir), "maxModelLen": 8192}
        },
    }
    (root / "models.json").write_text(json.dumps(registry))
    env = dict(os.environ, CY_LLM_MODELS_FILE=str(root / "models.json"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider",
        f"--basetemp={root / 'tmp'}", "--junitxml", str(root / "junit.xml"), *args.pytest_files,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.pytest_timeout)
    (out / "pytest.log").write_text(proc.stdout + proc.stderr)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
    return {
        "files": list(args.pytest_files),
        "engine_device_auto": "cuda" if torch.cuda.is_available() else "cpu",
        "returncode": proc.returncode,
        "summary": tail[0] if tail else "",
        "failed": [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))],
        "wall_s": round(time.monotonic() - started, 1),
    }
