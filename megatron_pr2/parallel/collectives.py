# Small collective helpers shared by route validation (agreement.py) and route exchange
# (parallel/exchange.py): the device a process group communicates on, "raise on every rank if any
# rank failed" (one rank's bad input becomes an error everywhere instead of a hang in the next
# collective its peers enter), and the two fixed-size exchanges of the routing() entry agreement.
#
# Chained groups: `groups` is one process group, or a group followed by groups that cross its
# copies (a pipeline stage's ranks, then the pipeline group): gathering over each in turn gives
# every rank every rank's row, and a MAX reduce over each in turn the maximum over all of them.

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


def comm_device(group: Any) -> torch.device:
    """Device for transfer tensors: NCCL needs CUDA tensors; gloo (the CPU path) takes CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_on_any_rank(
    error: Optional[Exception], group: Any, peer_message: str, device: Optional[torch.device] = None
) -> None:
    """Collective over `group`: re-raise this rank's `error`, or raise ValueError(peer_message)
    when another rank of the group reported one. A no-op collective-free call without an
    initialised process group or with a group of one rank."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        flag = torch.tensor(
            [0 if error is None else 1], dtype=torch.int64, device=device or comm_device(group)
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if error is None and int(flag) != 0:
            error = ValueError(peer_message)
    if error is not None:
        raise error


def gather_rows(row: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """Every rank's int64 `row` [K] over chained `groups`: [N, K] on CPU, the same rows on every
    rank (in group order, not global rank order). One all-gather per group and one host copy;
    N x K x 8 bytes, e.g. 96 KB for 1,000 ranks of 12 fields."""
    table = row.reshape(1, -1).to(torch.int64)
    for group in groups:
        size = dist.get_world_size(group)
        if size == 1:
            continue
        mine = table.reshape(-1).to(comm_device(group))
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
        table = torch.stack(parts).reshape(-1, row.numel())
    return table.cpu()


def max_over(values: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """Element-wise maximum of int `values` over chained `groups` (CPU result)."""
    for group in groups:
        if dist.get_world_size(group) == 1:
            continue
        values = values.to(comm_device(group))
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values.cpu()
