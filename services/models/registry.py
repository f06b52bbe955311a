"""The model registry file: `modelId` -> how to load and serve it (infra/models.json by default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec

from services.runtime import ENV_PREFIX, REPO_ROOT, data_dir

DEFAULT_REGISTRY = REPO_ROOT / "infra" / "models.json"


class ModelSource(msgspec.Struct, kw_only=True, rename="camel", frozen=True):
    """Where to build `modelPath` from when it is missing (a GGUF file shipped in a Python package)."""

    gguf_package: str = ""
    gguf_file: str = ""


class ModelSpec(msgspec.Struct, kw_only=True, rename="camel", frozen=True):
    name: str
    model_path: str
    engine: str = "auto"
    max_model_len: Annotated[int, msgspec.Meta(ge=16)] = 2048
    dtype: str = "float32"
    capabilities: list[str] = msgspec.field(default_factory=lambda: ["inference", "stream"])
    source: ModelSource | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # Adapters configured statically (name -> adapter directory); trained ones are added at run time.
    adapters: dict[str, str] = msgspec.field(default_factory=dict)


class Registry(msgspec.Struct, kw_only=True, frozen=True):
    default: str
    models: dict[str, ModelSpec]

    def resolve(self, model_id: str) -> tuple[str, ModelSpec] | None:
        """`model_id` or the alias "default" -> (real id, spec); None when not configured."""
        real = self.default if model_id == "default" else model_id
        spec = self.models.get(real)
        return (real, spec) if spec is not None else None


def registry_path() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}MODELS_FILE") or DEFAULT_REGISTRY).resolve()


def load_registry(path: Path | None = None) -> Registry:
    """Parse and validate the registry; `${CY_LLM_DATA_DIR}` and relative paths are expanded.

    Raises msgspec.ValidationError (with the JSON path) on a malformed file.
    """
    path = path or registry_path()
    text = path.read_text().replace("${CY_LLM_DATA_DIR}", str(data_dir()))
    reg = msgspec.json.decode(text, type=Registry)
    models = {
        mid: msgspec.structs.replace(spec, model_path=str((path.parent / spec.model_path).resolve()))
        for mid, spec in reg.models.items()
    }
    if reg.default not in models:
        raise msgspec.ValidationError(f"default model {reg.default!r} is not in `models`")
    return Registry(default=reg.default, models=models)
