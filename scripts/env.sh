# Sourced by demo.sh and test.sh: create .venv (or $REFINE_VENV) and install refine with the given extras.
# torch comes first and pinned: on a machine without torch, an unpinned `torch` pulls a multi-GB CUDA build.
# Where torch is already importable in the venv (e.g. a CUDA build you installed), it is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${REFINE_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${REFINE_TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q -c scripts/constraints.txt -e ".[$1]"
