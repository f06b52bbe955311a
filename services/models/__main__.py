"""`python -m services.models [modelId ...]`: prepare the given (default: every) registry model."""

from __future__ import annotations

import os
import sys

from services.engine.engines import openvino_weights, select_engine
from services.models.files import ensure_model, ensure_openvino
from services.models.registry import load_registry


def main(argv: list[str]) -> int:
    registry = load_registry()
    ids = argv or list(registry.models)
    for model_id in ids:
        resolved = registry.resolve(model_id)
        if resolved is None:
            print(f"unknown model {model_id!r}", file=sys.stderr)
            return 2
        print(f"{resolved[0]}: {ensure_model(resolved[1])}")
        if select_engine(resolved[1], os.environ.get("CY_LLM_ENGINE", "")) == "cpu-openvino":
            print(f"{resolved[0]} (cpu-openvino): {ensure_openvino(resolved[1], openvino_weights())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
