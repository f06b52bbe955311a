"""GPU checks of the engine and trainer: `python -m infra.gpu.check`."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
