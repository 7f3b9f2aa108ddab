# Parallel layouts of routes: MoE-layer numbering (layers.py), the tokens each rank routes
# (layout.py), slicing a canonical batch to one rank (sharding.py), the shard message format
# (codec.py) and scatter / gather between ranks (exchange.py).

from megatron_pr2.parallel.exchange import (
    exchange_routes,
    gather_routes,
    merge_routes,
    scatter_routes,
)
from megatron_pr2.parallel.layers import global_moe_layer_id, moe_layer_ids, moe_layer_pattern
from megatron_pr2.parallel.layout import layout_for_rank, thd_partitioned_indices
from megatron_pr2.parallel.sharding import check_shard, shard_routes

__all__ = [
    "layout_for_rank",
    "thd_partitioned_indices",
    "moe_layer_pattern",
    "moe_layer_ids",
    "global_moe_layer_id",
    "shard_routes",
    "check_shard",
    "scatter_routes",
    "gather_routes",
    "exchange_routes",
    "merge_routes",
]
