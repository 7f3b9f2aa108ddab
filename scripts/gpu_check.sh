#!/usr/bin/env bash
# One-GPU check (about 5 minutes on one H100/H200): NCCL world of one, CUDA uploads and host
# syncs of replay, the dispatch plan's host-sync removal (torch.cuda events), the Transformer
# Engine spec (when installed) and the router benchmark on CUDA. See benchmarks/gpu_check.py.
#
# usage: scripts/gpu_check.sh [--skip router,te] [--json PATH]
# Exit status: 0 ok, 1 a check failed, 2 no CUDA device, 124 over the time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
exec timeout "${GPU_CHECK_TIMEOUT:-300}" "${PYTHON}" -W ignore -m benchmarks.gpu_check "$@"
