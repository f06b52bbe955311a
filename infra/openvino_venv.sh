#!/usr/bin/env bash
# Create (or reuse) the virtualenv that exports models to OpenVINO IR: `bash infra/openvino_venv.sh [VENV_DIR]`
# (default $CY_LLM_OPENVINO_EXPORT_VENV, else ~/.cache/cy-llm/venv-openvino-export).
#
# Only the one-time export runs here (`optimum-cli export openvino`, called by services/models/files.py); serving
# needs nothing but `openvino-genai`, which the main venv has. A venv of its own because optimum-intel 2.2
# pins transformers<5.6 (the main venv runs a newer one) and imports fail against newer transformers.
#   - torch==2.13.0 (the CPU build on local disk here; a plain `torch` would pull a CUDA build);
#   - torchvision is uninstalled afterwards: optimum-intel asks for it, and PyPI's build does not load
#     beside this torch; the text-generation export never uses it;
#   - the venv lives outside the clone so that CI runs and fresh clones on this machine reuse it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${CY_LLM_OPENVINO_EXPORT_VENV:-$HOME/.cache/cy-llm/venv-openvino-export}}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
SPECS=(torch==2.13.0 optimum-intel==2.2.0 nncf==3.4.0 openvino==2026.4.1 openvino-tokenizers==2026.4.1.0)

key="$(printf '%s ' "${SPECS[@]}" | sha256sum | cut -c1-16)"
stamp="$VENV/.cy-llm-openvino-export-stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" && -x "$VENV/bin/optimum-cli" ]]; then
    echo "openvino export venv up to date: $VENV"
    exit 0
fi
started=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "${SPECS[@]}"
"${pip[@]}" uninstall -y torchvision 2>/dev/null || true
"$VENV/bin/python" -c "import optimum.intel.openvino" 
echo "$key" > "$stamp"
echo "openvino export venv ready in $((SECONDS - started)) s: $VENV"
