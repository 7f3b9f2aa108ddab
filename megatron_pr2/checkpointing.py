# Loading Megatron distributed (torch_dist) checkpoints into PR2 models, including checkpoints of
# stock models without PR2 predictor weights (upgrading a Megatron MoE model to PR2).
#
# A stock checkpoint lacks every `...router.predictor.*` tensor. Megatron's loader then fails on the
# first absent key (or, with strict="log_all", drops it and leaves the user to notice). Here the
# absent predictor entries are taken out of the load request, the predictors keep their zero
# initialisation (every predictor kind starts at a zero logit offset, so PR2 starts exactly as R2)
# and a warning says so. Any other absent tensor is still an error.

import logging
from typing import Any, Dict, List

import torch

logger = logging.getLogger(__name__)

PREDICTOR_KEY = ".predictor."
"""Substring of every PR2 predictor parameter / buffer name and checkpoint key."""


def report_absent_predictors(source: str, keys: List[str]) -> None:
    """Tell the user that `source` holds no weights for these predictor entries (one warning)."""
    if not keys:
        return
    logger.warning(
        "%s has no PR2 predictor weights (%d entries absent, e.g. %s), as saved from a stock "
        "Megatron model or another predictor kind: those predictors keep their zero "
        "initialisation, so PR2 starts exactly as plain routing replay (R2) and trains the "
        "predictor from here on. The next checkpoint saves them.",
        source,
        len(keys),
        keys[0],
    )


def _sharded_tensors(sharded_state_dict: Any, path: tuple = ()) -> List[tuple]:
    """(path of keys, ShardedTensor) of every ShardedTensor in a nested sharded state dict."""
    from megatron.core.dist_checkpointing import ShardedTensor

    out = []
    if isinstance(sharded_state_dict, dict):
        items = sharded_state_dict.items()
    elif isinstance(sharded_state_dict, list):
        items = enumerate(sharded_state_dict)
    else:
        return out
    for name, value in items:
        if isinstance(value, ShardedTensor):
            out.append((path + (name,), value))
        else:
            out.extend(_sharded_tensors(value, path + (name,)))
    return out


def drop_absent_predictor_entries(
    sharded_state_dict: Dict[str, Any], checkpoint_dir: str
) -> List[str]:
    """Remove the predictor entries that `checkpoint_dir` does not hold from a sharded state dict
    (in place, before `dist_checkpointing.load`); warn and return their checkpoint keys.

    Reads only the checkpoint's tensor metadata. Entries other than predictors are kept, so an
    absent policy weight still fails the load.
    """
    from megatron.core import dist_checkpointing

    saved = set(dist_checkpointing.load_tensors_metadata(checkpoint_dir))
    absent = []
    # Last first: deleting from a list parent must not shift the indices still to visit.
    for path, tensor in reversed(_sharded_tensors(sharded_state_dict)):
        if PREDICTOR_KEY in f".{tensor.key}" and tensor.key not in saved:
            parent = sharded_state_dict
            for name in path[:-1]:
                parent = parent[name]
            del parent[path[-1]]
            absent.append(tensor.key)
    report_absent_predictors(f"checkpoint {checkpoint_dir}", sorted(set(absent)))
    return absent


def load_dist_checkpoint(
    module: torch.nn.Module, checkpoint_dir: str, **load_kwargs: Any
) -> List[str]:
    """Load a torch_dist checkpoint into `module` (one model chunk), with or without predictor
    weights; returns the checkpoint keys of absent predictor entries (empty for a PR2
    checkpoint). `load_kwargs` go to `dist_checkpointing.load` (e.g. sharded_strategy).

    The usual Megatron-Core load, `module.load_state_dict(dist_checkpointing.load(
    module.sharded_state_dict(), checkpoint_dir))`, plus the stock-checkpoint upgrade: absent
    predictors stay at zero (with a warning); every other parameter must be in the checkpoint.
    """
    from megatron.core import dist_checkpointing

    sharded_state_dict = module.sharded_state_dict()
    absent = drop_absent_predictor_entries(sharded_state_dict, checkpoint_dir)
    state = dist_checkpointing.load(sharded_state_dict, checkpoint_dir, **load_kwargs)
    if not absent:
        module.load_state_dict(state)
        return absent
    result = module.load_state_dict(state, strict=False)
    not_predictor = [k for k in result.missing_keys if PREDICTOR_KEY not in f".{k}"]
    if not_predictor or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {checkpoint_dir} does not match the model beyond its predictors: "
            f"missing {not_predictor[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return absent
