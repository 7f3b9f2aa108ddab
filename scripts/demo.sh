#!/usr/bin/env bash
# Set up the environment (megatron-core 0.16.1, CPU torch) and run the RL comparison demo.
#
# usage: scripts/demo.sh [demo args...]     e.g. scripts/demo.sh --quick
# Default: the drift preset's comparison of none, r2 and pr2 (linear head and lookahead) x 3 seeds
# on CPU (add --modes none r2 r3 pr2 pr2-r3 for every mode); writes the table, PNG plots, a
# markdown report and TensorBoard logs under runs/rl_demo.
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE_VERSION="${MCORE_VERSION:-0.16.1}"
venv=".venv-mcore${MCORE_VERSION}"
bash scripts/setup_env.sh "${MCORE_VERSION}" "${venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "${venv}/bin/python" -m megatron_pr2.rl.demo --compare "$@"
