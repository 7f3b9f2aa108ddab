# Optimizer wiring of the PR2 predictor: it trains at alpha x the base learning rate.
#
# Two equivalent routes: torch optimizers take `predictor_param_groups`; Megatron's
# get_megatron_optimizer takes the per-parameter config_overrides of
# megatron_pr2.arguments.pr2_optimizer_config_overrides (both select by the `pr2_predictor` tag).

from typing import List, Sequence, Union

import torch


def is_predictor_param(param: torch.nn.Parameter) -> bool:
    """True for PR2 predictor parameters (tagged `pr2_predictor` by PR2Router)."""
    return bool(getattr(param, "pr2_predictor", False))


def predictor_param_groups(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    base_lr: float,
    alpha: float,
    weight_decay: float = 0.0,
) -> List[dict]:
    """Param groups: every other parameter at base_lr, predictor parameters at alpha x base_lr.

    The predictor group has no weight decay: decay would pull the drift estimate back to R2.
    """
    if not alpha > 0:
        raise ValueError(f"predictor_param_groups alpha={alpha!r}: must be > 0")
    chunks = model if isinstance(model, (list, tuple)) else [model]
    predictor, rest = [], []
    for chunk in chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                (predictor if is_predictor_param(param) else rest).append(param)
    groups = [{"params": rest, "lr": base_lr, "weight_decay": weight_decay}]
    if predictor:
        groups.append({"params": predictor, "lr": base_lr * alpha, "weight_decay": 0.0})
    return groups
