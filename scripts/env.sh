# Sourced by the other scripts: a project virtualenv (.venv) with qwen-edge installed editable plus the
# extras in $EXTRAS (default: export,serve,test). When the tests' extra is wanted, torch is pinned and installed
# first so that pip takes the CPU build (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QWEN_EDGE_VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-export,serve,test}"
CHECK="import toolkit, export, onnx, gguf, safetensors, scipy"
[[ "$EXTRAS" == *serve* ]] && CHECK="$CHECK, starlette, uvicorn, llguidance"
[[ "$EXTRAS" == *test* ]] && CHECK="$CHECK, torch, transformers, pytest, openai, hypothesis"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
pip_quiet() {  # pip without the harmless notes about local index folders this machine does not have
    python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" >&2 || true
}
if ! python -c "$CHECK" 2>/dev/null; then
    echo "setting up $VENV (qwen-edge[$EXTRAS]) ..." >&2
    pip_quiet --upgrade pip
    [[ "$EXTRAS" == *test* ]] && pip_quiet "torch==2.13.0"
    pip_quiet -c "$ROOT/scripts/constraints.txt" -e "$ROOT[$EXTRAS]"
    python -c "$CHECK"  # fail loudly if the install did not work
fi
cd "$ROOT"
