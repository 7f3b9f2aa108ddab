# What a record pass produces: which router rows the predictor cache keeps, each router call's
# record on the host as it is made, and one recorded microbatch of a rank's routers assembled
# into a RouteBatch.
#
# Shapes: T_local router rows of one microbatch on this rank, L_local MoE layers of this rank, k
# top-k, C_local cached rows, H hidden, E experts.
#   host record per router call  top_indices [T_local, k] in the narrowest integer dtype,
#                                dropped [T_local, k] bool, hidden [C_local, H] and logits
#                                [C_local, E] in PR2Config.cache_dtype
# On CUDA the copies are non_blocking into pinned memory: no host sync per microbatch or layer,
# one stream sync when the handle packs the routes (RoutingSession.recorded_routes).

import functools
import math
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import torch

from megatron_pr2.bitpack import bits_for, pack_bits
from megatron_pr2.config import PR2Config, stride_for
from megatron_pr2.parallel.layers import moe_layer_pattern
from megatron_pr2.parallel.sharding import shard_identity
from megatron_pr2.residency import cache_torch_dtype
from megatron_pr2.route_answer import Recorded
from megatron_pr2.routes import (
    PredictorCache,
    RouteBatch,
    TokenLayout,
    narrowest_int_dtype,
    shared_full_layout,
)

if TYPE_CHECKING:  # annotations only: the packing helpers import no megatron-core
    from megatron_pr2.router import PR2Router


def cache_rows(
    layout: TokenLayout,
    cache_tokens_per_sequence: int,
    eligible: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Router rows whose tokens the predictor cache keeps: a fixed stride along each sequence.

    eligible: [B, S] bool in canonical order (token b * S + s), True where a token may train
    the predictor (e.g. the loss mask: never padding or post-EOS tokens). The stride then runs
    over each sequence's eligible tokens, so a sequence keeps up to cache_tokens_per_sequence of
    them. Computed on the whole microbatch, so every rank of a token-split layout agrees."""
    if eligible is None:
        stride = stride_for(layout.seq_length, cache_tokens_per_sequence)
        if stride is None:
            return torch.zeros(0, dtype=torch.int64)
        position = layout.token_index % layout.seq_length
        return torch.nonzero(position % stride == 0).squeeze(1)
    eligible = eligible.detach().to("cpu", torch.bool)
    if eligible.dim() != 2 or eligible.numel() != layout.num_tokens:
        raise ValueError(
            f"routing cache_mask of shape {tuple(eligible.shape)}: expected [batch, seq] with "
            f"{layout.num_tokens} tokens (seq_length {layout.seq_length})"
        )
    if cache_tokens_per_sequence == 0:
        return torch.zeros(0, dtype=torch.int64)
    count = eligible.sum(dim=1, keepdim=True)  # [B, 1] eligible tokens per sequence
    if cache_tokens_per_sequence == -1:
        stride = torch.ones_like(count)
    else:
        stride = (-(-count // cache_tokens_per_sequence)).clamp(min=1)
    rank = torch.cumsum(eligible.long(), dim=1) - 1  # position among the eligible tokens
    keep = (eligible & (rank % stride == 0)).reshape(-1)
    return torch.nonzero(keep[layout.token_index]).squeeze(1)


def microbatch_cache_tokens(
    layout: TokenLayout, cache_tokens_per_sequence: int, eligible: Optional[torch.Tensor] = None
) -> int:
    """C: tokens of the whole microbatch of `layout` that the predictor cache keeps (the sum of
    every rank's cache_rows), recorded in a shard's identity for the loss weight C_local / C."""
    if eligible is None and layout.seq_length:
        # cache_rows of the whole microbatch, counted: the stride keeps positions 0, stride, ...
        # of every sequence (the routing() entry asks this of every replayed microbatch).
        stride = stride_for(layout.seq_length, cache_tokens_per_sequence)
        if stride is None:
            return 0
        sequences, rest = divmod(layout.num_tokens, layout.seq_length)
        return sequences * -(-layout.seq_length // stride) + -(-rest // stride)
    full = TokenLayout(torch.arange(layout.num_tokens), layout.num_tokens, layout.seq_length)
    return int(cache_rows(full, cache_tokens_per_sequence, eligible).numel())


@functools.lru_cache(maxsize=8)
def _shared_cache_rows(seq_length: int, batch_size: int, cache_tokens: int) -> torch.Tensor:
    # Read-only like the layout it indexes: its users gather with it, none writes it.
    return cache_rows(shared_full_layout(seq_length, batch_size), cache_tokens)


def record_cache_rows(
    layout: TokenLayout,
    config: PR2Config,
    cache_mask: Optional[List[torch.Tensor]],
    microbatch: int,
    shared: bool = False,
) -> torch.Tensor:
    """cache_rows of one recorded microbatch, with its entry of routing(cache_mask=). shared: the
    layout is a shared_full_layout, whose rows without a mask are computed once per run, not at
    every routing() entry."""
    if shared and cache_mask is None:
        batch_size = layout.num_tokens // layout.seq_length
        return _shared_cache_rows(layout.seq_length, batch_size, config.cache_tokens_per_sequence)
    eligible = None
    if cache_mask is not None:
        if microbatch >= len(cache_mask):
            raise ValueError(
                f"routing cache_mask has {len(cache_mask)} microbatches; the model ran "
                f"microbatch {microbatch}"
            )
        eligible = cache_mask[microbatch]
    return cache_rows(layout, config.cache_tokens_per_sequence, eligible)


def host_copy(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`tensor` on the host in `dtype` (converted on its device first, so only the narrow bytes
    travel). CUDA: a non_blocking copy into pinned memory, valid once the current stream has
    synchronised; elsewhere the converted tensor itself."""
    if dtype is not None and tensor.dtype != dtype:  # (a no-op .to still costs a dispatch)
        tensor = tensor.to(dtype)
    if tensor.device.type != "cuda":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out


def host_record(router: "PR2Router", record: Recorded) -> Recorded:
    """The host copy of one router call's record (narrow indices, cache in cache_dtype)."""
    cache_dtype = cache_torch_dtype(router.pr2_config)
    return Recorded(
        host_copy(record.top_indices, narrowest_int_dtype(router.config.num_moe_experts)),
        None if record.dropped is None else host_copy(record.dropped),
        None if record.hidden is None else host_copy(record.hidden, cache_dtype),
        None if record.logits is None else host_copy(record.logits, cache_dtype),
    )


def _stack_layers(tensors: List[torch.Tensor]) -> torch.Tensor:
    """[N, ...] tensors -> [N, L, ...]; one layer needs no copy (a stage with one MoE layer)."""
    if len(tensors) == 1:
        return tensors[0].unsqueeze(1)
    return torch.stack(tensors, dim=1)


def canonical_order(layout: TokenLayout) -> Optional[torch.Tensor]:
    """The permutation that puts the rows of a full layout in canonical token order, None when
    they already are (one sequence, or a layout made so): then no row gather at all."""
    batch_size = layout.num_tokens // layout.seq_length if layout.seq_length else 0
    if batch_size and layout is shared_full_layout(layout.seq_length, batch_size):
        return _shared_order(layout.seq_length, batch_size)  # once per run, not per record pass
    token_index = layout.token_index
    if torch.equal(token_index, torch.arange(token_index.numel())):
        return None
    return torch.argsort(token_index)


@functools.lru_cache(maxsize=8)
def _shared_order(seq_length: int, batch_size: int) -> Optional[torch.Tensor]:
    # canonical_order of a shared_full_layout; read only, like the layout.
    layout = shared_full_layout(seq_length, batch_size)
    return None if batch_size == 1 else torch.argsort(layout.token_index)


def record_layers(routers: List["PR2Router"]) -> Tuple[torch.Tensor, bool]:
    """MoE-layer ids of `routers` (sorted by id) and whether they are all of the model's."""
    layer_ids = tuple(r.moe_layer_id for r in routers)
    return _record_layers(layer_ids, sum(moe_layer_pattern(routers[0].config)))


@functools.lru_cache(maxsize=16)
def _record_layers(layer_ids: Tuple[int, ...], num_moe_layers: int) -> Tuple[torch.Tensor, bool]:
    # Once per set of layers (every record pass of a run records the same ones); the ids tensor
    # is read only (a RouteBatch's layer_index, a shard identity's source).
    ids = torch.tensor(layer_ids, dtype=torch.int64)
    return ids, layer_ids == tuple(range(num_moe_layers))


@functools.lru_cache(maxsize=16)
def _count_offsets(microbatches: int, layers: int, num_experts: int) -> torch.Tensor:
    # [M, 1, L, 1] int32 bincount key offsets of each (microbatch, layer column), made once per
    # shape (every record pass of a run packs the same shape); read only.
    offsets = torch.arange(microbatches * layers, dtype=torch.int32) * num_experts
    return offsets.view(microbatches, 1, layers, 1)


def pack_microbatches(
    indices: List[torch.Tensor], num_experts: int
) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """(packed ids, [L, E] int32 expert_counts) of each [T, L, k] host tensor of `indices`, made
    with one pack_bits and one bincount for all of them instead of a few small ops each (the
    record pass packs M microbatches at once). The same bytes as RouteBatch packs itself: a
    microbatch of a multiple of 8 ids is whole groups of the joint stream. None where that does
    not hold (other shapes, device tensors): RouteBatch packs each then."""
    shape = indices[0].shape
    if (
        len(indices) < 2
        or math.prod(shape) % 8
        or any(t.shape != shape or t.device.type != "cpu" for t in indices)
    ):
        return None
    M, L = len(indices), shape[1]
    stacked = torch.stack(indices)  # [M, T, L, k]
    packed = pack_bits(stacked, bits_for(num_experts)).view(M, -1)
    # Key of (microbatch, layer column, expert): one bincount counts every microbatch. (The
    # add promotes the narrow ids to int32: no separate widening copy.)
    keys = (stacked + _count_offsets(M, L, num_experts)).reshape(-1)
    counts = torch.bincount(keys, minlength=M * L * num_experts).view(M, L, num_experts)
    counts = counts.to(torch.int32)
    # Copies, not views of the joint tensors: a RouteBatch saved or sent alone carries its own
    # bytes only. (unbind: one call for the M views.)
    return [(p.clone(), c.clone()) for p, c in zip(packed.unbind(0), counts.unbind(0))]


def ordered_indices(
    records: List[Recorded], layout: TokenLayout, order: Union[torch.Tensor, None, str] = "compute"
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """indices and dropped [T_local, L_local, k] of one microbatch's records (sorted by MoE-layer
    id), rows in canonical token order when this rank saw every token. order: canonical_order
    of the layout when the caller has it."""
    indices = _stack_layers([rec.top_indices for rec in records])
    dropped = None
    if records[0].dropped is not None:
        dropped = _stack_layers([rec.dropped for rec in records])
    if layout.is_full():
        if isinstance(order, str):
            order = canonical_order(layout)
        if order is not None:
            indices = indices.index_select(0, order)
            dropped = None if dropped is None else dropped.index_select(0, order)
    return indices, dropped


def assemble_record(
    routers: List["PR2Router"],
    records: List[Recorded],
    layout: TokenLayout,
    cached_rows: Optional[torch.Tensor],
    cached_tokens: Optional[int] = None,
    layers: Optional[Tuple[torch.Tensor, bool]] = None,
    ordered: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
    packed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> RouteBatch:
    """The RouteBatch of one microbatch from the records of `routers` (sorted by MoE-layer id):
    indices [T_local, L_local, k] in canonical token order when this rank saw every token.
    The records are host copies already (host_record). A shard of a token-split layout
    carries its identity (with cached_tokens, the microbatch's cache size). `layers`
    (record_layers), `ordered` (ordered_indices) and `packed` (pack_microbatches) when the
    caller made them for several microbatches at once (assemble_records)."""
    layer_ids, all_layers = record_layers(routers) if layers is None else layers
    config = routers[0].config
    indices, dropped = ordered_indices(records, layout) if ordered is None else ordered
    cache = None
    if records[0].hidden is not None:
        cache = PredictorCache(
            token_index=layout.token_index.index_select(0, cached_rows),
            hidden=_stack_layers([rec.hidden for rec in records]),
            logits=_stack_layers([rec.logits for rec in records]),
        )
    token_index, identity = None, None  # full layout: rows in canonical order (ordered_indices)
    if not layout.is_full():
        token_index = layout.token_index
        identity = shard_identity(layout, layer_ids, cached_tokens if cache is not None else None)
    return RouteBatch(
        indices,
        config.num_moe_experts,
        dropped=dropped,
        token_index=token_index,
        layer_index=None if all_layers else layer_ids,
        num_tokens=layout.num_tokens,
        seq_length=layout.seq_length,
        cache=cache,
        identity=identity,
        trusted=True,  # the routers' own top-k and layout: nothing to validate per value
        packed=packed,
    )


def assemble_records(
    routers: List["PR2Router"],
    records: List[List[Recorded]],
    layouts: List[TokenLayout],
    cached_rows: List[Optional[torch.Tensor]],
    cached_tokens: List[Optional[int]],
) -> List[RouteBatch]:
    """assemble_record of every recorded microbatch (records[m]: microbatch m's records of
    `routers`, sorted by MoE-layer id), with the layer ids, each layout's canonical order and
    the bit packing made once for all of them."""
    layers, orders = record_layers(routers), {}  # orders: per layout object (ids unique)
    ordered = []
    for recs, layout in zip(records, layouts):
        if layout.is_full() and id(layout) not in orders:
            orders[id(layout)] = canonical_order(layout)
        ordered.append(ordered_indices(recs, layout, orders.get(id(layout))))
    packs = pack_microbatches(
        [indices for indices, _ in ordered], routers[0].config.num_moe_experts
    )
    packs = packs or [None] * len(ordered)
    return [
        assemble_record(routers, *args, layers, done, pack)
        for *args, done, pack in zip(records, layouts, cached_rows, cached_tokens, ordered, packs)
    ]
