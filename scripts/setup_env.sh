#!/usr/bin/env bash
# Create (or reuse) a virtual environment with megatron-pr2 and one megatron-core release.
#
# usage: scripts/setup_env.sh [MCORE_VERSION] [VENV_DIR]     (defaults: 0.16.1 .venv-mcore0.16.1)
# torch is pinned to 2.13.0: on our CPU machines pip takes the CPU build from the local wheel
# cache, while an unpinned torch would pull a multi-GB CUDA build. megatron-core 0.17+ declare
# Python >= 3.12 but run on 3.11, so they install with --ignore-requires-python --no-deps.
set -euo pipefail
MCORE_VERSION="${1:-0.16.1}"
VENV_DIR="${2:-.venv-mcore${MCORE_VERSION}}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

if [ ! -x "${VENV_DIR}/bin/python" ]; then
  # First run only; later runs reuse the environment and finish in seconds.
  echo "setup: creating ${VENV_DIR} with torch ${TORCH_VERSION:-2.13.0} (CPU build), megatron-core" \
    "${MCORE_VERSION}, megatron-pr2 and its dev tools (pytest, black, ruff, matplotlib," \
    "tensorboard, sentencepiece): about 2 minutes and 1.4 GB on the 2-core development" \
    "machine (first run only)" >&2
  "${PYTHON}" -m venv "${VENV_DIR}"
fi
start=$(date +%s)
PIP=("${VENV_DIR}/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
case "${MCORE_VERSION}" in
  0.16.*) "${PIP[@]}" "megatron-core==${MCORE_VERSION}" ;;
  *) "${PIP[@]}" --no-deps --ignore-requires-python "megatron-core==${MCORE_VERSION}" ;;
esac
# The package with its own dependencies and the dev tools, as setup.py lists them (torch and
# megatron-core are already satisfied, so pip keeps the pinned builds above).
"${PIP[@]}" -e ".[dev]"
# On CPU machines megatron-core 0.19 imports only after the CPU patches (no triton there).
"${VENV_DIR}/bin/python" -c "from megatron_pr2.cpu import apply_cpu_patches; apply_cpu_patches()
import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__)"
echo "setup: ${VENV_DIR} ready in $(( $(date +%s) - start )) s" >&2
