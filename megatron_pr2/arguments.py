# Command-line flags of PR2 for Megatron-LM scripts, and their optimizer wiring.
#
# `add_pr2_args` is an extra_args_provider: pass it to Megatron-LM's
# `pretrain(..., extra_args_provider=add_pr2_args)` or `parse_args(extra_args_provider=...)`, or
# call it on any argparse parser. One kebab-case `--pr2-<field>` flag per PR2Config field (dest
# `pr2_<field>`, default and help taken from the dataclass), plus `--pr2-mode`, the RL routing
# strategy (megatron_pr2.phases.STRATEGIES).
#
# `pr2_config_from_args(args)` turns parsed args into a PR2Config; user errors name the flag.
# `megatron_optimizer_kwargs(args)` gives get_megatron_optimizer the predictor learning rate:
# megatron-core 0.16 to 0.19 take per-parameter `config_overrides` (ParamKey -> overrides), so
# predictor parameters (tagged `pr2_predictor`) get max_lr / min_lr = alpha x the base values.

import argparse
import dataclasses
import re
from typing import Any, Dict, Optional

from megatron_pr2.config import (
    CACHE_DTYPES,
    LOSS_KINDS,
    MISSING_ROUTE_POLICIES,
    PREDICTOR_KINDS,
    PREDICTOR_UPDATES,
    PR2Config,
)
from megatron_pr2.optim import check_predictor_decay, predictor_update_hyperparameters
from megatron_pr2.phases import STRATEGIES

_CHOICES = {
    "predictor": PREDICTOR_KINDS,
    "loss": LOSS_KINDS,
    "missing_route_policy": MISSING_ROUTE_POLICIES,
    "predictor_update": PREDICTOR_UPDATES,
    "cache_dtype": CACHE_DTYPES,
}


def flag_of(field_name: str) -> str:
    """Command-line flag of a PR2Config field: predictor_rank -> --pr2-predictor-rank."""
    return "--pr2-" + field_name.replace("_", "-")


def dest_of(field_name: str) -> str:
    """argparse dest of a PR2Config field: predictor_rank -> pr2_predictor_rank."""
    return "pr2_" + field_name


def _help(text: str, default: Any) -> str:
    # argparse %-formats help strings: a literal % in a docstring must be escaped.
    return f"{text} (default: {default!r})".replace("%", "%%")


def add_pr2_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the "PR2" argument group to `parser` and return it (Megatron extra_args_provider)."""
    group = parser.add_argument_group(
        title="PR2", description="Predictive Routing Replay for MoE reinforcement learning"
    )
    group.add_argument(
        "--pr2-mode",
        type=str,
        default="none",
        choices=STRATEGIES,
        help=_help(
            "RL routing strategy: none (stock routing), r2 (record the old-policy pass, replay "
            "it in training), r3 (record the rollout, replay it in the old-policy pass and "
            "training), pr2 (r2 with the evolution predictor), pr2-r3 (r3 with the predictor).",
            "none",
        ),
    )
    docs = PR2Config.field_docs()
    for f in dataclasses.fields(PR2Config):
        flag, dest = flag_of(f.name), dest_of(f.name)
        kwargs: Dict[str, Any] = dict(
            dest=dest, default=f.default, help=_help(docs[f.name], f.default)
        )
        if f.type in (bool, "bool"):
            # --pr2-telemetry / --no-pr2-telemetry
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {int: int, float: float, str: str, "int": int, "float": float}.get(
                f.type, str
            )
            if f.name in _CHOICES:
                kwargs["choices"] = _CHOICES[f.name]
        group.add_argument(flag, **kwargs)
    return parser


_CONFIG_ERROR = re.compile(r"^PR2Config\.(\w+)=(.*?): (.*)$", re.DOTALL)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def pr2_config_from_args(args: argparse.Namespace) -> PR2Config:
    """PR2Config from parsed `--pr2-*` args; a bad value raises ValueError naming its flag.

    Fields whose dest is absent from `args` keep PR2Config's default (so a Namespace from a parser
    without add_pr2_args still works, e.g. in a test).
    """
    mode = getattr(args, "pr2_mode", "none")
    if mode not in STRATEGIES:
        raise ValueError(f"--pr2-mode={mode}: must be one of {STRATEGIES}")
    values = {}
    for f in dataclasses.fields(PR2Config):
        dest = dest_of(f.name)
        if hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    try:
        return PR2Config(**values)
    except ValueError as error:
        match = _CONFIG_ERROR.match(str(error))
        if match is None:
            raise
        name, why = match.group(1), match.group(3)
        value = values.get(name, getattr(PR2Config, name, None))
        raise ValueError(f"{flag_of(name)}={_format_value(value)}: {why}") from error


def pr2_optimizer_config_overrides(
    optimizer_config: Any,
    alpha: float,
    config_overrides: Optional[dict] = None,
    predictor_update: str = "adam",
    predictor_weight_decay: float = 0.0,
) -> dict:
    """`config_overrides` for get_megatron_optimizer with the PR2 predictor at alpha x lr.

    optimizer_config: megatron.core.optimizer.OptimizerConfig (its lr / min_lr are the base).
    config_overrides: the overrides to extend; None means Megatron's standard ones
    (get_standard_config_overrides: no weight decay on biases and 1-D parameters), which is what
    get_megatron_optimizer would apply itself when given None. The input dict is not modified.

    Predictor parameters (attribute `pr2_predictor`, set by PR2Router) get max_lr = alpha x lr,
    min_lr = alpha x min_lr (so warmup and decay follow the base schedule, scaled) and weight decay
    `predictor_weight_decay` (PR2Config; 0 in the paper). Megatron's scheduler sets a group's
    weight decay to its wd_mult x the scheduled --weight-decay at every step, so a nonzero value
    is a wd_mult of predictor_weight_decay / --weight-decay (and follows a weight-decay schedule
    proportionally); it needs --weight-decay > 0.
    """
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    if not alpha > 0:
        raise ValueError(f"--pr2-alpha={_format_value(alpha)}: must be > 0")
    if optimizer_config.lr is None:
        raise ValueError("--lr is required: the PR2 predictor trains at --pr2-alpha x --lr")
    if config_overrides is None:
        config_overrides = get_standard_config_overrides(config=optimizer_config)
    merged = dict(config_overrides)
    # `pr2_predictor` marks the group (the distributed optimizer's fp32 shards lose the param
    # tag) for optim.predictor_step_frozen.
    check_predictor_decay(
        alpha * optimizer_config.lr, predictor_weight_decay, flag_of("predictor_weight_decay")
    )
    wd_mult = 0.0
    if predictor_weight_decay > 0:
        if not optimizer_config.weight_decay:
            raise ValueError(
                f"--pr2-predictor-weight-decay={_format_value(predictor_weight_decay)} needs "
                f"--weight-decay > 0 (got {optimizer_config.weight_decay}): Megatron scales a "
                "group's weight decay as a multiple (wd_mult) of it"
            )
        wd_mult = predictor_weight_decay / optimizer_config.weight_decay
    override = {"max_lr": alpha * optimizer_config.lr, "wd_mult": wd_mult, "pr2_predictor": True}
    # PR2Config.predictor_update: per-group Adam hyperparameters (Megatron's Adam reads them).
    override.update(predictor_update_hyperparameters(predictor_update))
    if optimizer_config.min_lr is not None:
        override["min_lr"] = alpha * optimizer_config.min_lr
    merged[ParamKey(attr="pr2_predictor")] = override
    return merged


def megatron_optimizer_kwargs(
    args: argparse.Namespace,
    optimizer_config: Any = None,
    config_overrides: Optional[dict] = None,
) -> Dict[str, Any]:
    """Keyword arguments that give get_megatron_optimizer the predictor learning rate.

    Usage (megatron-core 0.16 to 0.19):
        config = OptimizerConfig(...)          # or megatron.training's get_megatron_optimizer_config
        optimizer = get_megatron_optimizer(config, model, **megatron_optimizer_kwargs(args, config))

    optimizer_config defaults to an OptimizerConfig built from the matching fields of `args` (as
    Megatron-LM does). Returns {"config_overrides": ...} (see pr2_optimizer_config_overrides).
    """
    if optimizer_config is None:
        from megatron.core.optimizer import OptimizerConfig

        names = {f.name for f in dataclasses.fields(OptimizerConfig)}
        optimizer_config = OptimizerConfig(**{k: v for k, v in vars(args).items() if k in names})
    pr2 = pr2_config_from_args(args)
    return {
        "config_overrides": pr2_optimizer_config_overrides(
            optimizer_config,
            pr2.alpha,
            config_overrides,
            pr2.predictor_update,
            pr2.predictor_weight_decay,
        )
    }


def megatron_lm_args() -> Any:
    """Megatron-LM's parsed global args (megatron.training.get_args)."""
    from megatron.training import get_args

    return get_args()
