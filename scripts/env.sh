# Sourced by the other scripts: a project virtualenv (.venv) with qwen-edge installed editable, plus the
# converter's and the tests' extras. torch is pinned and installed first so that pip takes the CPU build
# (an unpinned torch would pull a multi-GB CUDA build through transformers).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QWEN_EDGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
if ! python -c "import toolkit, export, torch, transformers, pytest" 2>/dev/null; then
    echo "setting up $VENV ..." >&2
    python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
    python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    python -m pip install --quiet --disable-pip-version-check -e "$ROOT[export,test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    python -c "import toolkit, export, torch, transformers, pytest"  # fail loudly if the install did not work
fi
cd "$ROOT"
