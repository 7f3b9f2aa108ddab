# Canonical -> per-rank routes: slice a canonical RouteBatch to one rank's router rows and MoE
# layers (bit-exact), and check a shard against the rank's layout.
#
# Shapes: canonical indices [T, L, k]; a shard holds [T_local, L_local, k] with token_index
# [T_local] (canonical token of each router row, parallel/layout.py) and layer_index [L_local]
# (global MoE-layer ids, parallel/layers.py).

from typing import Optional, Sequence, Tuple, Union

import torch

from megatron_pr2.identity import ShardIdentity
from megatron_pr2.routes import PredictorCache, RouteBatch, TokenLayout

IntSeq = Union[torch.Tensor, Sequence[int]]


def layer_tensor(layer_ids: IntSeq) -> torch.Tensor:
    return torch.as_tensor(layer_ids).to("cpu", torch.int64).reshape(-1)


def row_tokens(routes: RouteBatch) -> torch.Tensor:
    if routes.token_index is not None:
        return routes.token_index
    return torch.arange(routes.shape[0])


def row_layers(routes: RouteBatch) -> torch.Tensor:
    if routes.layer_index is not None:
        return routes.layer_index
    return torch.arange(routes.shape[1])


def shard_identity(
    layout: TokenLayout, layer_ids: torch.Tensor, cached_tokens: Optional[int] = None
) -> Optional[ShardIdentity]:
    """The identity of a shard cut for `layout` and `layer_ids` (None for a hand-made layout);
    cached_tokens: predictor-cache tokens of the whole microbatch."""
    if layout.identity is None:
        return None
    layers = tuple(int(x) for x in layer_ids.tolist())
    return ShardIdentity(layout.identity, layers, cached_tokens)


def cached_tokens(routes: RouteBatch) -> Optional[int]:
    """Predictor-cache tokens of the whole microbatch of `routes` (None: no cache, or a shard
    that does not know it)."""
    if routes.cache is None:
        return None
    if routes.token_index is None:
        return int(routes.cache.token_index.numel())
    return None if routes.identity is None else routes.identity.cached_tokens


def describe_layouts(local: RouteBatch, layout: TokenLayout) -> str:
    """' (shard cut for ...; this rank: ...)' where identities are known, for error messages."""
    if local.token_index is None:
        shard = "routes cut for: none (canonical)"
    else:
        cut = "no identity" if local.identity is None else local.identity.describe()
        shard = f"shard cut for {cut}"
    mine = (
        "a hand-made layout (no identity)"
        if layout.identity is None
        else layout.identity.describe()
    )
    return f" ({shard}; this rank: {mine})"


def _slice_cache(
    cache: Optional[PredictorCache], token_index: torch.Tensor, columns: torch.Tensor
) -> Optional[PredictorCache]:
    """Cached tokens of `token_index` (in the cache's own order), layer columns `columns`."""
    if cache is None:
        return None
    keep = torch.isin(cache.token_index.to(torch.int64), token_index)
    return cache.select_tokens(keep).select_layers(columns)


def slice_shard(
    routes: RouteBatch,
    full_indices: torch.Tensor,
    full_dropped: Optional[torch.Tensor],
    token_index: torch.Tensor,
    layer_ids: torch.Tensor,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[PredictorCache]]:
    rows = routes.rows_for(token_index)
    cols = routes.columns_for(layer_ids)
    indices = full_indices[rows][:, cols]
    dropped = None if full_dropped is None else full_dropped[rows][:, cols]
    return indices, dropped, _slice_cache(routes.cache, token_index, cols)


def check_request(routes: RouteBatch, num_tokens: int, seq_length: Optional[int]) -> None:
    if routes.num_tokens != num_tokens:
        raise ValueError(
            f"routes hold a microbatch of {routes.num_tokens} tokens; the layout expects "
            f"num_tokens={num_tokens} (batch_size * seq_length)"
        )
    if seq_length is not None and routes.seq_length is not None and routes.seq_length != seq_length:
        raise ValueError(
            f"routes have seq_length={routes.seq_length}; the layout has seq_length={seq_length}"
        )


def shard_routes(routes: RouteBatch, layout: TokenLayout, layer_ids: IntSeq) -> RouteBatch:
    """The slice of `routes` one rank needs: rows in router order, the stage's MoE layers.

    Pure slicing (bit-exact): missing tokens and capacity-drop masks are kept; the predictor
    cache keeps the cached tokens of this layout and the stage's layer columns.
    """
    layer_ids = layer_tensor(layer_ids)
    check_request(routes, layout.num_tokens, layout.seq_length)
    indices, dropped, cache = slice_shard(
        routes, routes.indices, routes.dropped, layout.token_index, layer_ids
    )
    return RouteBatch(
        indices,
        routes.num_experts,
        dropped=dropped,
        token_index=layout.token_index,
        layer_index=layer_ids,
        num_tokens=layout.num_tokens,
        seq_length=layout.seq_length,
        cache=cache,
        identity=shard_identity(layout, layer_ids, cached_tokens(routes)),
    )


def check_shard(local: RouteBatch, layout: TokenLayout, layer_ids: IntSeq) -> None:
    """Raise ValueError unless `local` is exactly this rank's shard (tokens and layers); the
    message names the layout the shard was cut for and this rank's."""
    layer_ids = layer_tensor(layer_ids)
    both = describe_layouts(local, layout)
    if local.shape[0] != layout.token_index.numel():
        raise ValueError(
            f"route shard has {local.shape[0]} tokens; this rank's routers route "
            f"{layout.token_index.numel()} tokens{both}"
        )
    if local.shape[1] != layer_ids.numel():
        raise ValueError(
            f"route shard has {local.shape[1]} MoE layers; this pipeline stage holds "
            f"{layer_ids.numel()} MoE layers {layer_ids.tolist()}{both}"
        )
    if local.num_tokens != layout.num_tokens:
        raise ValueError(
            f"route shard belongs to a microbatch of {local.num_tokens} tokens; the layout has "
            f"{layout.num_tokens}{both}"
        )
    if not torch.equal(row_tokens(local), layout.token_index):
        raise ValueError(
            "route shard rows are not this rank's tokens in router order (token_index "
            f"mismatch){both}"
        )
    if not torch.equal(row_layers(local), layer_ids):
        raise ValueError(
            f"route shard layers {row_layers(local).tolist()} != this stage's MoE layers "
            f"{layer_ids.tolist()}{both}"
        )
