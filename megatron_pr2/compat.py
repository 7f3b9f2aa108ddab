# Every megatron-core version gate of megatron-pr2 lives in this file (supported: 0.16 to 0.19).
#
# Nothing else in the package compares versions or probes megatron-core for optional names: code
# calls the helpers below, so supporting a new release means editing one file.

import functools
from typing import Any, Callable, Optional

import megatron.core
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from packaging.version import Version

MCORE_VERSION = Version(megatron.core.__version__)
MIN_MCORE, MAX_MCORE_EXCLUSIVE = Version("0.16.0"), Version("0.20.0")


def check_mcore_version() -> None:
    """Raise if the installed megatron-core is outside the supported range."""
    if not (MIN_MCORE <= MCORE_VERSION < MAX_MCORE_EXCLUSIVE):
        raise RuntimeError(
            f"megatron-pr2 supports megatron-core >={MIN_MCORE},<{MAX_MCORE_EXCLUSIVE}; "
            f"found {MCORE_VERSION}"
        )


# ---------------------------------------------------------------------------------------------
# MoE spec form: a ModuleSpec(module=MoELayer, submodules=MoESubmodules) on 0.16, and
# functools.partial(MoELayer, submodules=MoESubmodules) on newer releases.
# ---------------------------------------------------------------------------------------------
def moe_submodules_of(spec: Any) -> Optional[MoESubmodules]:
    """Return the MoESubmodules of an MoE-layer spec in either form, else None."""
    if isinstance(spec, ModuleSpec):
        module, submodules = spec.module, spec.submodules
    elif isinstance(spec, functools.partial):
        module, submodules = spec.func, spec.keywords.get("submodules")
    else:
        return None
    if isinstance(module, type) and issubclass(module, MoELayer):
        assert isinstance(submodules, MoESubmodules), f"MoELayer spec without submodules: {spec}"
        return submodules
    return None


# ---------------------------------------------------------------------------------------------
# Metrics tracker: save_to_aux_losses_tracker exists in both; 0.19 keeps its state in a tracker
# object and exposes the legacy dict view through get_moe_layer_wise_logging_tracker().
# ---------------------------------------------------------------------------------------------
save_to_aux_losses_tracker: Callable = moe_utils.save_to_aux_losses_tracker
get_moe_layer_wise_logging_tracker: Callable = moe_utils.get_moe_layer_wise_logging_tracker
clear_aux_losses_tracker: Callable = moe_utils.clear_aux_losses_tracker


# ---------------------------------------------------------------------------------------------
# Metrics tracker, continued (megatron_lm.report_pr2_metrics): the reduction step of
# track_moe_metrics exists in both releases; removing entries needs the live container, the
# tracker dict itself in 0.16 and MoEMetricsTracker.metrics in 0.19 (where
# get_moe_layer_wise_logging_tracker returns a copy of the dict).
# ---------------------------------------------------------------------------------------------
reduce_aux_losses_tracker_across_ranks: Callable = moe_utils.reduce_aux_losses_tracker_across_ranks


def _live_moe_metrics() -> dict:
    """The tracker's own entry dict (0.19: MoEMetricsTracker.metrics; 0.16: the global dict)."""
    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        return moe_utils.get_moe_metrics_tracker().metrics
    return moe_utils.get_moe_layer_wise_logging_tracker()


def discard_moe_metrics(names) -> None:
    """Remove the named entries from Megatron-Core's MoE metrics tracker (missing names: no-op)."""
    live = _live_moe_metrics()
    for name in names:
        live.pop(name, None)


def reset_moe_metrics() -> None:
    """Drop every entry of the tracker. Megatron sizes an entry by the layer count of the first
    model that logs into it, so models of different depths in one process (tests, sweeps) need
    the entries dropped, not just zeroed as clear_aux_losses_tracker does."""
    _live_moe_metrics().clear()


# ---------------------------------------------------------------------------------------------
# CUDA graphs around the alltoall dispatcher's preprocess (dispatch_plan.py refuses them): the
# test MoEAlltoAllTokenDispatcher.__init__ makes, on config.cuda_graph_scope / CudaGraphScope in
# 0.16 and config.cuda_graph_modules / CudaGraphModule in 0.19 (CudaGraphScope stays there only
# as a deprecated checkpoint alias with other members).
# ---------------------------------------------------------------------------------------------
try:
    from megatron.core.transformer.enums import CudaGraphModule as _CudaGraphPart

    _CUDA_GRAPH_PARTS_FIELD = "cuda_graph_modules"
except ImportError:  # 0.16
    from megatron.core.transformer.enums import CudaGraphScope as _CudaGraphPart

    _CUDA_GRAPH_PARTS_FIELD = "cuda_graph_scope"


def cuda_graph_captures_moe_preprocess(config: Any) -> bool:
    """True if CUDA graphs capture the alltoall dispatcher's preprocess under `config`."""
    parts = getattr(config, _CUDA_GRAPH_PARTS_FIELD)
    return config.cuda_graph_impl != "none" and (
        _CudaGraphPart.moe_preprocess in parts or not parts
    )


def router_force_biased(config: Any) -> Optional[float]:
    """config.moe_router_force_biased (megatron-core >= 0.19: a random bias added to the router
    logits in TopKRouter.forward, for benchmarking); None where the field does not exist."""
    return getattr(config, "moe_router_force_biased", None)
