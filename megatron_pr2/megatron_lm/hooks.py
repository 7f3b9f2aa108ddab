# Megatron-LM (megatron.training) integration: a runtime patch of megatron.training.training
# that wires PR2 into pretrain()/train() (patches/README.md; patches/*.patch is the same change
# as a source diff).

import functools
import importlib
import importlib.util
import inspect
import sys
import typing
from typing import Any, Callable, Dict, Optional

from megatron_pr2.arguments import (
    megatron_lm_args,
    pr2_config_from_args,
    pr2_optimizer_config_overrides,
)
from megatron_pr2.megatron_lm.metrics import report_pr2_metrics
from megatron_pr2.megatron_lm.schedule import take_last_train_handle, wrap_forward_backward_func


def import_megatron_training() -> Any:
    """Import megatron.training (Megatron-LM's training loop) and return the package.

    megatron-core 0.19's wheel ships megatron.training; 0.16.1's does not (use a Megatron-LM
    checkout on PYTHONPATH). megatron.training 0.19 needs Python >= 3.12 for typing.override
    alone; on 3.11 that one name is backported from typing_extensions (nothing else changes).
    On a machine without CUDA call megatron_pr2.cpu.apply_cpu_patches() first.
    """
    if importlib.util.find_spec("megatron.training") is None:
        raise ImportError(
            "megatron.training (Megatron-LM) is not importable: the megatron-core 0.16 wheel does "
            "not ship it; put a Megatron-LM checkout on PYTHONPATH"
        )
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    return importlib.import_module("megatron.training")


def pr2_optimizer_overrides_from_args(optimizer_config: Any, config_overrides: Optional[dict]):
    """config_overrides with the predictor at --pr2-alpha x lr, --pr2-predictor-update and
    --pr2-predictor-weight-decay (Megatron-LM's global args)."""
    pr2 = pr2_config_from_args(megatron_lm_args())
    return pr2_optimizer_config_overrides(
        optimizer_config,
        pr2.alpha,
        config_overrides,
        pr2.predictor_update,
        pr2.predictor_weight_decay,
    )


def log_pr2_metrics(iteration: int, total_loss_dict: Optional[dict] = None) -> Dict[str, float]:
    """report_pr2_metrics for Megatron-LM's training_log: every rank, every iteration.

    Uses the handle of the latest pr2_step("train") block (None where there was none) and
    Megatron-LM's args and writers. Does nothing under --pr2-mode none (the same on all ranks).
    """
    from megatron.training import get_tensorboard_writer, get_wandb_writer

    args = megatron_lm_args()
    if getattr(args, "pr2_mode", "none") == "none":
        return {}
    handle = take_last_train_handle()
    return report_pr2_metrics(
        handle,
        iteration,
        get_tensorboard_writer(),
        get_wandb_writer(),
        num_layers=args.num_layers,
        moe_layer_freq=args.moe_layer_freq,
        mtp_num_layers=args.mtp_num_layers,
        per_layer_logging=args.moe_per_layer_logging,
        total_loss_dict=total_loss_dict,
    )


_HOOKED_NAMES = ("get_forward_backward_func", "get_megatron_optimizer", "training_log")
_ORIGINALS: Dict[str, Callable] = {}


def install_megatron_lm_hooks() -> None:
    """Runtime patch of megatron.training.training (Megatron-LM) for PR2; idempotent.

    Module attributes of megatron.training.training are wrapped (nothing else changes):
      * get_forward_backward_func: its result is wrapped by wrap_forward_backward_func, so
        train()/evaluate() calls route as the active pr2_step block says (unchanged outside);
      * get_megatron_optimizer: config_overrides gain the predictor's alpha x lr group
        (--pr2-alpha), on top of the overrides Megatron-LM passes;
      * training_log: log_pr2_metrics(iteration) runs first, on every rank.
    Install before calling pretrain(); use pr2_model_provider and extra_args_provider=add_pr2_args.
    patches/README.md documents it; patches/megatron-lm-0.19.2-training-pr2.patch is the same
    change as a source diff.
    """
    training = importlib.import_module("megatron.training.training")
    missing = [name for name in _HOOKED_NAMES if not hasattr(training, name)]
    if missing:
        raise RuntimeError(f"megatron.training.training has no {missing}: unsupported Megatron-LM")
    if _ORIGINALS:
        return
    originals = {name: getattr(training, name) for name in _HOOKED_NAMES}

    get_fbf = originals["get_forward_backward_func"]

    @functools.wraps(get_fbf)
    def get_forward_backward_func(*args: Any, **kwargs: Any) -> Callable:
        return wrap_forward_backward_func(get_fbf(*args, **kwargs))

    get_optimizer = originals["get_megatron_optimizer"]
    optimizer_signature = inspect.signature(get_optimizer)
    if "config_overrides" not in optimizer_signature.parameters:
        raise RuntimeError(
            "get_megatron_optimizer takes no config_overrides: megatron-core >= 0.16 required"
        )

    @functools.wraps(get_optimizer)
    def get_megatron_optimizer(*args: Any, **kwargs: Any) -> Any:
        bound = optimizer_signature.bind(*args, **kwargs)
        bound.arguments["config_overrides"] = pr2_optimizer_overrides_from_args(
            bound.arguments["config"], bound.arguments.get("config_overrides")
        )
        return get_optimizer(*bound.args, **bound.kwargs)

    log = originals["training_log"]
    log_signature = inspect.signature(log)

    @functools.wraps(log)
    def training_log(*args: Any, **kwargs: Any) -> Any:
        bound = log_signature.bind(*args, **kwargs)
        log_pr2_metrics(bound.arguments["iteration"])
        return log(*args, **kwargs)

    training.get_forward_backward_func = get_forward_backward_func
    training.get_megatron_optimizer = get_megatron_optimizer
    training.training_log = training_log
    _ORIGINALS.update(originals)


def remove_megatron_lm_hooks() -> None:
    """Undo install_megatron_lm_hooks (tests, or switching PR2 off in one process)."""
    if not _ORIGINALS:
        return
    training = importlib.import_module("megatron.training.training")
    for name, original in _ORIGINALS.items():
        setattr(training, name, original)
    _ORIGINALS.clear()
