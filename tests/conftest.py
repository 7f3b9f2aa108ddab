# pytest setup shared by all megatron-pr2 tests.
#
# Puts the repository root (megatron_pr2) and tests/ (harness) first on sys.path, so tests can
# `from harness import run_distributed, init_megatron_parallel, ...` with or without an installed
# package; ranks spawned by the harness inherit this sys.path.
#
# `no_leaked_processes` (session, autouse): every process the test run started (ranks, their
# checkpoint-writer managers and resource trackers, launcher subprocesses) must be gone when the
# session ends; a survivor fails the run and is then killed. Processes are attributed to this run
# by an environment marker they inherit, so an orphan (its parent killed, re-parented to init) is
# still found, and other jobs on the machine are never counted.

import os
import sys
import time
import uuid

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
for _path in (_TESTS_DIR, _REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

RUN_MARKER = "PR2_TEST_RUN_ID"
# Set before any test starts a process; every child inherits it (setdefault: a re-import in a
# child keeps the parent's id).
os.environ.setdefault(RUN_MARKER, uuid.uuid4().hex)

# Processes that are already exiting (a killed rank's helpers) get this long to finish.
_EXIT_WAIT_S = 30.0


def run_processes() -> list:
    """Every running process of this test run except this one: descendants, and orphans that
    carry this run's marker in their environment."""
    import psutil

    me = psutil.Process()
    marker = os.environ[RUN_MARKER]
    # This process's own multiprocessing resource tracker (started by the harness's queue)
    # lives as long as this process and exits with it.
    own = {me.pid, _own_resource_tracker_pid()}
    found = {p.pid: p for p in me.children(recursive=True) if p.pid not in own}
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid in own:
            continue
        try:
            if proc.environ().get(RUN_MARKER) == marker:
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or another user's process
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _own_resource_tracker_pid() -> int:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None) or -1


def _key(proc) -> tuple:
    return (proc.pid, proc.create_time())


def leaked_processes(before: set, wait_s: float = _EXIT_WAIT_S) -> list:
    """Processes of this run not in `before` (from `process_snapshot`) that still run after up
    to `wait_s` seconds."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        survivors = []
        for proc in run_processes():
            try:
                if _key(proc) not in before:
                    survivors.append(proc)
            except psutil.NoSuchProcess:
                continue
        if not survivors or time.monotonic() > deadline:
            return survivors
        time.sleep(0.5)


def process_snapshot() -> set:
    """(pid, create_time) of every process of this run right now."""
    import psutil

    out = set()
    for proc in run_processes():
        try:
            out.add(_key(proc))
        except psutil.NoSuchProcess:
            continue
    return out


def describe(procs: list) -> str:
    import psutil

    lines = []
    for proc in procs:
        try:
            lines.append(f"pid {proc.pid} ppid {proc.ppid()}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"pid {proc.pid} (gone)")
    return "\n".join(lines)


def kill_all(procs: list) -> None:
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes():
    """Fail the run if a process it started outlives it (then kill the survivors)."""
    before = process_snapshot()
    yield
    survivors = leaked_processes(before)
    if survivors:
        text = describe(survivors)
        kill_all(survivors)
        pytest.fail(f"{len(survivors)} process(es) started by the test run survived it:\n{text}")
