# The multi-rank harness leaves nothing behind and detects hangs by itself: ranks exit cleanly
# after a torch_dist checkpoint save (whose writer starts a multiprocessing Manager per save),
# a rank killed after a peer failed takes its helper processes with it, and a rank blocked in a
# collective raises through the gloo process-group timeout.

import multiprocessing
import time

import pytest
import torch
from conftest import leaked_processes, process_snapshot
from harness import DistributedTestError, run_distributed


def _save_torch_dist(ckpt_dir: str) -> int:
    """Save a small torch_dist checkpoint the way Megatron does; return how many helper
    processes this rank has afterwards (the writer's Manager and its resource tracker)."""
    from megatron_pr2.cpu import apply_cpu_patches

    apply_cpu_patches()  # torch_dist save calls torch.cuda.synchronize()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    weight = torch.arange(4.0) + 10 * rank
    state = {"weight": ShardedTensor.from_rank_offsets("weight", weight, (0, rank, world))}
    dist_checkpointing.save(state, ckpt_dir)
    torch.distributed.barrier()
    import psutil

    return len(psutil.Process().children(recursive=True))


def test_no_process_survives_a_checkpoint_saving_launch(tmp_path):
    before = process_snapshot()
    helpers = run_distributed(_save_torch_dist, 2, str(tmp_path))
    # The save really started helper processes: without them this test could not fail.
    assert all(n >= 1 for n in helpers), helpers
    survivors = leaked_processes(before, wait_s=10)
    assert not survivors, [p.pid for p in survivors]


def _manager_then_hang() -> None:
    manager = multiprocessing.get_context("spawn").Manager()
    manager.Queue().put(1)
    if torch.distributed.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    time.sleep(3600)  # rank 0 hangs (outside any collective) until the harness kills it


def test_killed_rank_takes_its_helper_processes_along():
    before = process_snapshot()
    with pytest.raises(DistributedTestError, match="deliberate failure on rank 1"):
        run_distributed(_manager_then_hang, 2)
    survivors = leaked_processes(before, wait_s=10)
    assert not survivors, [p.pid for p in survivors]


def _rank_one_sleeps() -> None:
    if torch.distributed.get_rank() == 1:
        time.sleep(3600)
    torch.distributed.barrier()


def test_a_blocked_collective_raises_by_its_own_timeout():
    # The launch timeout is far away; the gloo timeout makes rank 0 raise with a traceback.
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as error:
        run_distributed(_rank_one_sleeps, 2, timeout=600, collective_timeout=20)
    message = str(error.value)
    assert "TIMEOUT after" not in message, message
    assert "----- rank 0 (error)" in message and "barrier" in message.lower(), message
    assert time.monotonic() - start < 600
