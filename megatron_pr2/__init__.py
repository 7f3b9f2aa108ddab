# megatron-pr2: Predictive Routing Replay (PR2) for Megatron-Core MoE reinforcement learning.
#
# Public contract (docs/design.md section 4): PR2Config, apply_pr2, routing, RouteBatch. Names load
# lazily so that `import megatron_pr2.cpu` works before megatron-core can be imported (on CPU,
# megatron-core 0.19 needs megatron_pr2.cpu.apply_cpu_patches() first).

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PR2Config": "megatron_pr2.config",
    "apply_pr2": "megatron_pr2.spec",
    "routing": "megatron_pr2.routing_context",
    "RoutingHandle": "megatron_pr2.routing_context",
    "pr2_routers": "megatron_pr2.model_index",
    "local_layout": "megatron_pr2.model_index",
    "local_layer_ids": "megatron_pr2.model_index",
    "shard_routes": "megatron_pr2.parallel",
    "scatter_routes": "megatron_pr2.parallel",
    "gather_routes": "megatron_pr2.parallel",
    "RouteBatch": "megatron_pr2.routes",
    "RouteError": "megatron_pr2.agreement",
    "PredictorCache": "megatron_pr2.routes",
    "TokenLayout": "megatron_pr2.routes",
    "PR2Router": "megatron_pr2.router",
    "predictor_param_groups": "megatron_pr2.optim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_pr2' has no attribute {name!r}")
