# pytest setup shared by all megatron-pr2 tests.
#
# Puts the repository root (megatron_pr2) and tests/ (harness) first on sys.path, so tests can
# `from harness import run_distributed, init_megatron_parallel, ...` with or without an installed
# package; ranks spawned by the harness inherit this sys.path.

import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
for _path in (_TESTS_DIR, _REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)
