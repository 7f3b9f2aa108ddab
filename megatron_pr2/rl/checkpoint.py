# Crash-safe resume of the RL loop: which checkpoint to load when the newest one is unreadable.
#
# A run directory holds checkpoints/step_<n>/rank<r>.pt (one file per rank, each written to a
# temporary name and renamed) and checkpoints/latest.json naming the newest complete save. A crash,
# a full disk or a truncated copy can still leave a file that does not load; resume then falls
# back to the previous checkpoint and says so, with every rank agreeing on the one it loads.

import json
import os
import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist


def checkpoint_candidates(root: str) -> List[str]:
    """Checkpoint directories under `root`, newest first: the one latest.json names, then every
    step_* directory by step (latest.json may be unreadable or name a torn save)."""
    found = []
    if os.path.isdir(root):
        steps = sorted((d for d in os.listdir(root) if d.startswith("step_")), reverse=True)
        found = [os.path.join(root, d) for d in steps]
    latest = os.path.join(root, "latest.json")
    if os.path.exists(latest):
        try:
            with open(latest) as f:
                named = json.load(f)["path"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            warnings.warn(f"{latest} is unreadable ({error}); trying every step_* directory")
        else:
            others = [p for p in found if os.path.abspath(p) != os.path.abspath(named)]
            found = [named] + others
    return found


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on every rank (one MIN all-reduce of a single integer)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def newest_readable(
    candidates: List[str], read: Callable[[str], dict], device: torch.device
) -> Optional[Tuple[str, dict]]:
    """(path, this rank's state) of the first candidate that `read` loads on every rank; None
    when there is no candidate. Each skipped checkpoint is reported with a warning naming the
    one tried next; when none is readable, RuntimeError (a silent fresh start would discard the
    run). Every rank must call this with the same candidates."""
    for index, path in enumerate(candidates):
        try:
            state, error = read(path), None
        except Exception as exc:  # noqa: BLE001 - any unreadable file means: try the previous
            state, error = None, exc
        if all_ranks(state is not None, device):
            return path, state
        # One line, cut short: unpickling errors run to many lines.
        detail = " ".join(str(error).split())[:200]
        where = "on another rank" if error is None else f"({type(error).__name__}: {detail})"
        following = candidates[index + 1] if index + 1 < len(candidates) else None
        fallback = f"falling back to {following}" if following else "no earlier checkpoint"
        warnings.warn(f"checkpoint {path} is unreadable {where}; {fallback}")
    if candidates:
        raise RuntimeError(
            f"no readable checkpoint among {candidates}; move them away to start the run afresh"
        )
    return None
