# Small collective helpers shared by route validation (session.py, routing.py) and route
# exchange (parallel/exchange.py): the device a process group communicates on, and "raise on every
# rank if any rank failed", which turns one rank's bad input into an error everywhere instead of a
# hang in the next collective its peers enter.

from typing import Any, Optional

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
