# Optimizer wiring of the PR2 predictor: it trains at alpha x the base learning rate.
#
# Two equivalent routes: torch optimizers take `predictor_param_groups`; Megatron's
# get_megatron_optimizer takes the per-parameter config_overrides of
# megatron_pr2.arguments.pr2_optimizer_config_overrides (both select by the `pr2_predictor` tag,
# and both mark the predictor's param group with the key `pr2_predictor`).
#
# `predictor_step_frozen(optimizer)` wraps optimizer.step() on mini-steps without a predictor
# loss (mini-step 1, or no cached tokens): the predictor then has an exact-zero gradient, and
# AdamW would still move it by its momentum (and weight decay). As the PR2 authors do, the
# predictor group runs that step with lr 0 and weight decay 0, so W_p stays bit-unchanged.

from contextlib import contextmanager
from typing import Iterator, List, Sequence, Union

import torch


def is_predictor_param(param: torch.nn.Parameter) -> bool:
    """True for PR2 predictor parameters (tagged `pr2_predictor` by PR2Router)."""
    return bool(getattr(param, "pr2_predictor", False))


def predictor_update_hyperparameters(update: str) -> dict:
    """Adam(W) hyperparameters of the predictor's group for PR2Config.predictor_update: none
    for "adam"; for "sgd" beta1 = 0 and eps = 1, so the step is lr x gradient / (1 + |v|^0.5)
    = plain gradient descent while |gradient| << 1."""
    if update == "adam":
        return {}
    if update == "sgd":
        return {"betas": (0.0, 0.999), "eps": 1.0}
    raise ValueError(f"predictor_update={update!r}: must be 'adam' or 'sgd'")


def check_predictor_decay(
    predictor_lr: float,
    predictor_weight_decay: float,
    name: str = "PR2Config.predictor_weight_decay",
) -> None:
    """Decoupled weight decay shrinks W_p by predictor_lr x predictor_weight_decay per step: a
    fraction above 1 would flip its sign. `name`: the setting as the user wrote it."""
    if predictor_lr * predictor_weight_decay > 1.0:
        raise ValueError(
            f"{name}={predictor_weight_decay:g}: with predictor lr "
            f"{predictor_lr:g} (alpha x lr) it would shrink W_p by "
            f"{predictor_lr * predictor_weight_decay:g} of itself per step (at most 1)"
        )


def predictor_param_groups(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    base_lr: float,
    alpha: float,
    weight_decay: float = 0.0,
    update: str = "adam",
    predictor_weight_decay: float = 0.0,
) -> List[dict]:
    """Param groups: every other parameter at base_lr, predictor parameters at alpha x base_lr
    (with the Adam hyperparameters of `update`, PR2Config.predictor_update).

    The predictor group's weight decay is `predictor_weight_decay` (PR2Config; 0 in the paper),
    not the model's `weight_decay`.
    """
    if not alpha > 0:
        raise ValueError(f"predictor_param_groups alpha={alpha!r}: must be > 0")
    check_predictor_decay(base_lr * alpha, predictor_weight_decay)
    chunks = model if isinstance(model, (list, tuple)) else [model]
    predictor, rest = [], []
    for chunk in chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                (predictor if is_predictor_param(param) else rest).append(param)
    groups = [{"params": rest, "lr": base_lr, "weight_decay": weight_decay}]
    if predictor:
        groups.append(
            {
                "params": predictor,
                "lr": base_lr * alpha,
                "weight_decay": predictor_weight_decay,
                "pr2_predictor": True,
                **predictor_update_hyperparameters(update),
            }
        )
    return groups


def predictor_groups(optimizer) -> List[dict]:
    """The param groups of `optimizer` that hold the PR2 predictor: marked `pr2_predictor` (by
    predictor_param_groups or pr2_optimizer_config_overrides: Megatron's distributed optimizer
    keeps the group dicts but replaces the parameters by fp32 shards, which lose the tag), or
    made of tagged parameters only. Megatron's ChainedOptimizer lists every sub-optimizer's."""
    out = []
    for group in optimizer.param_groups:
        params = list(group["params"])
        tagged = [is_predictor_param(p) for p in params]
        if group.get("pr2_predictor") or (params and all(tagged)):
            out.append(group)
        elif any(tagged):
            raise ValueError(
                "an optimizer param group mixes PR2 predictor and other parameters: build the "
                "groups with predictor_param_groups (or pr2_optimizer_config_overrides)"
            )
    return out


@contextmanager
def predictor_step_frozen(optimizer, frozen: bool = True) -> Iterator[None]:
    """Within the block (around optimizer.step()), the predictor's param groups have lr 0 and
    weight decay 0, so the step leaves the predictor bit-unchanged (its optimizer moments still
    decay, as in the PR2 authors' implementation); restored on exit. frozen=False: no-op."""
    groups = predictor_groups(optimizer) if frozen else []
    saved = [(group["lr"], group.get("weight_decay")) for group in groups]
    for group in groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    try:
        yield
    finally:
        for group, (lr, weight_decay) in zip(groups, saved):
            group["lr"] = lr
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
