# In-process single-rank Megatron setup for fast router tests (no spawned processes).
#
# Initialises a gloo world of 1 in this pytest process once, applies the CPU patches and yields
# Megatron's process groups for TP = PP = EP = 1. Multi-rank tests use harness.run_distributed.

import contextlib
import os
from typing import Iterator

import torch
from harness import _free_port, init_megatron_parallel


@contextlib.contextmanager
def single_rank(seed: int = 1234) -> Iterator[object]:
    """Gloo world of 1 in this process + Megatron parallel state; yields the pg_collection."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    with init_megatron_parallel(seed=seed) as pg_collection:
        yield pg_collection
