# Sourced by scripts/study.sh and scripts/test.sh: makes ./.venv with loraplace and its
# dependencies, once. Needs only python3 (>= 3.10) and pip.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORAPLACE_VENV:-$ROOT/.venv}"
# torch 2.13.0: on the project's CPU machines pip finds its CPU build locally; elsewhere set
# TORCH_SPEC (e.g. TORCH_SPEC="torch" for your platform's default build).
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.loraplace-installed"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  # quant: bitsandbytes (one ~43 MB wheel), so that the quantized-model tests run on CPU instead of skipping
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev,ray,quant]"
  "$VENV/bin/python" -c "import loraplace, torch, transformers, peft" 
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
