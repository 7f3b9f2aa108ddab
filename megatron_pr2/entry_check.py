# This rank's half of the routing(..., "replay") entry agreement (agreement.py): validate every
# microbatch's routes before any forward and reduce what only the ranks together can check to a
# few integers (EntryFacts).
#
# Checked here, any exception (whatever its type) becoming this rank's error:
#   - the model holds PR2 routers (or no MoE layer at all: a dense pipeline stage only joins),
#     with distinct MoE-layer ids, not inside another routing() context;
#   - one RouteBatch per microbatch, as many as num_microbatches when the caller knows it;
#   - the layout each microbatch replays against is this rank's own, taken from its routers'
#     process groups: a shard's identity (the layout it was cut for), or without one its
#     token_index, and routing(layout=) itself; then k, E, tokens, rows, MoE layers, missing
#     routes (session.check);
#   - moe_pad_expert_input_to_capacity: the recorded kept set fits the capacity the dispatcher
#     pads this rank's rows to, else replay would not be exact;
#   - the predictor cache: this rank's share C_local / C, from the layouts (no collective later).
# Left to the agreement: microbatch counts, TP peers' routes (without SP), the microbatch shapes
# and packings of the ranks that share microbatches.
#
# Shapes: T_local router rows, L_local MoE layers of this rank, k top-k, E experts.

from typing import Any, List, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import get_capacity

from megatron_pr2.agreement import EntryFacts, group_key
from megatron_pr2.identity import LayoutIdentity, layout_mismatch, stable_hash
from megatron_pr2.parallel.layers import moe_layer_pattern
from megatron_pr2.parallel.sharding import cached_tokens, describe_layouts
from megatron_pr2.records import cache_rows, microbatch_cache_tokens
from megatron_pr2.residency import HostRoutes, cached_positions
from megatron_pr2.router import PR2Router
from megatron_pr2.routes import RouteBatch, TokenLayout
from megatron_pr2.session import RoutingSession


def own_identity(session: RoutingSession) -> LayoutIdentity:
    """This rank's layout as its routers' process groups define it (packing unknown)."""
    router = session.routers[0]
    cp = router.cp_group.size()
    identity = LayoutIdentity(
        tp_rank=router.tp_group.rank(),
        tp_size=router.tp_group.size(),
        sequence_parallel=router.config.sequence_parallel,
        cp_rank=router.cp_group.rank(),
        cp_size=cp,
        zigzag=cp > 1,
    )
    return identity.with_stage(*session.stage)


def _not_mine(microbatch: int, why: str, cut_for: str, mine: object, layers: List) -> str:
    return (
        f"microbatch {microbatch}: the route shard is not this rank's: {why}. It was cut for "
        f"{cut_for}; this rank routes {mine}, MoE layers {layers} (cut shards with shard_routes "
        "/ scatter_routes for this rank's layout)"
    )


class _Described:
    """`own` described in an f-string, formatted only when an error message is built."""

    def __init__(self, own: LayoutIdentity) -> None:
        self.own = own

    def __str__(self) -> str:
        return f"{self.own.describe(packing=False)} (from the routers' process groups)"


def replay_layout(session: RoutingSession, microbatch: int, own: LayoutIdentity) -> TokenLayout:
    """The layout microbatch `microbatch` replays against on this rank, after checking that it
    is this rank's: routing(layout=) and shard identities against `own`, a shard without
    identity by its rows against the layout of the routers' groups."""
    batch = session.routes[microbatch]
    layers = sorted(r.moe_layer_id for r in session.routers)
    shard = batch.identity
    # This rank's layout, as its routers' process groups give it (they do not know the packing);
    # described only for an error (every microbatch passes here).
    mine = _Described(own)
    if shard is not None:
        absent = sorted(set(layers) - set(shard.layer_ids))
        if absent:
            why = f"it has no MoE layers {absent}"
            raise ValueError(_not_mine(microbatch, why, shard.describe(), mine, layers))
    layout = session.layout
    if layout is not None:
        if layout.identity is not None:
            why = layout_mismatch(layout.identity, own, own_packing_known=False)
            if why is not None:
                raise ValueError(
                    f"routing(layout=) is not this rank's layout: {why}; it was made for "
                    f"{layout.identity.describe()}, this rank routes {mine}"
                )
            if shard is not None:
                why = layout_mismatch(shard.layout, layout.identity, own_packing_known=True)
                if why is not None:
                    given = f"{layout.identity.describe()} (routing(layout=))"
                    raise ValueError(_not_mine(microbatch, why, shard.describe(), given, layers))
        return layout
    if batch.token_index is None:
        return session.entry_layout(microbatch)  # canonical: cut for this rank on the spot
    if shard is not None:
        why = layout_mismatch(shard.layout, own, own_packing_known=False)
        if why is not None:
            raise ValueError(_not_mine(microbatch, why, shard.describe(), mine, layers))
        return session.entry_layout(microbatch)
    if batch.seq_length is None:
        raise ValueError(
            f"microbatch {microbatch}: a route shard without identity or seq_length cannot be "
            "checked against this rank's layout: cut it with shard_routes / scatter_routes, or "
            "pass routing(layout=megatron_pr2.local_layout(model, ...))"
        )
    expected = session.router_layout(batch.num_tokens // batch.seq_length, batch.seq_length)
    if not torch.equal(batch.token_index, expected.token_index):
        raise ValueError(
            f"microbatch {microbatch}: the route shard's rows are not this rank's tokens"
            f"{describe_layouts(batch, expected)}: this rank routes tokens "
            f"{expected.token_index[:6].tolist()}..., the shard holds "
            f"{batch.token_index[:6].tolist()}...; cut shards with shard_routes / scatter_routes "
            "(they record the layout), or pass routing(layout=) for another token order (THD)"
        )
    return expected


def cache_share(session: RoutingSession, microbatch: int, layout: TokenLayout) -> float:
    """C_local / C: this rank's share of the microbatch's cached tokens, from the routes alone.
    Canonical routes hold the whole cache; a shard holds its rows' and knows C from its identity
    (set where it was cut or recorded). A shard without it must hold exactly the rows the cache
    stride keeps here (no cache_mask), and C follows from the stride."""
    batch = session.routes[microbatch]
    if batch.cache is None:
        return 1.0
    if batch.token_index is None and layout.is_full():
        return 1.0  # canonical routes on a rank that routes every token: it holds all C
    local = int(cached_positions(batch.cache, layout)[1].sum())
    total = cached_tokens(batch)
    if total is None:
        n = session.routers[0].pr2_config.cache_tokens_per_sequence
        strided = cache_rows(layout, n).numel() if batch.seq_length is not None else -1
        if local != strided:
            raise ValueError(
                f"microbatch {microbatch}: the route shard's predictor cache holds {local} of this "
                f"rank's tokens and does not say how many the microbatch caches; without a "
                f"cache_mask, PR2Config.cache_tokens_per_sequence={n} would cache {strided}. Cut "
                "shards with shard_routes / scatter_routes (they record the total)"
            )
        total = microbatch_cache_tokens(layout, n)
    return local / total if total else 0.0


def check_capacity(microbatch: int, local: HostRoutes, routers: List[PR2Router]) -> None:
    """moe_pad_expert_input_to_capacity pads every expert to the capacity of this rank's rows
    and drops what exceeds it: replay is exact only if the recorded kept set fits."""
    config = routers[0].config
    _, rows, k = local.indices.shape  # [L_local, T_local, k]
    capacity = get_capacity(
        num_tokens=rows * k,  # as the dispatcher's preprocess computes it
        num_experts=config.num_moe_experts,
        capacity_factor=config.moe_expert_capacity_factor,
    )
    ids = [r.moe_layer_id for r in routers]
    columns = [local.columns[i] for i in ids]
    indices = local.indices[columns].to(torch.int64)
    kept = (indices >= 0) & ~local.dropped[columns]
    E = config.num_moe_experts
    offset = torch.arange(len(ids)).view(-1, 1, 1) * E
    counts = torch.bincount((indices + offset)[kept], minlength=len(ids) * E).view(len(ids), E)
    if int(counts.max()) > capacity:
        layer, expert = divmod(int(counts.argmax()), E)
        raise ValueError(
            f"moe_pad_expert_input_to_capacity=True cannot replay microbatch {microbatch} "
            f"exactly on this rank: its {rows} router rows keep {int(counts.max())} tokens for "
            f"expert {expert} of MoE layer {ids[layer]}, but the dispatcher pads every expert "
            f"to a capacity of {capacity} (ceil({rows} x k={k} / {E} experts x "
            f"moe_expert_capacity_factor={config.moe_expert_capacity_factor})) and would drop "
            "the rest. The routes were recorded with the tokens split differently across ranks "
            "(other TP / SP / CP sizes): replay them on the layout they were recorded on, or set "
            "moe_pad_expert_input_to_capacity=False (recorded drops then replay exactly)"
        )


def _route_digest(indices: torch.Tensor) -> int:
    """Position-sensitive checksum of a route tensor (to compare ranks cheaply)."""
    flat = indices.reshape(-1).to(torch.int64) + 2
    weights = torch.arange(flat.numel(), dtype=torch.int64) % 65521 + 1
    return int((flat * weights).sum())


def _packing(layout: TokenLayout) -> Optional[str]:
    identity = layout.identity
    return identity.packing if identity is not None and identity.cp_size > 1 else None


def _check(
    session: RoutingSession, facts: EntryFacts, pp_group: Any, num_microbatches: Optional[int]
) -> None:
    routes = session.routes
    if routes is not None and num_microbatches is not None and len(routes) != num_microbatches:
        raise ValueError(
            f"{len(routes)} microbatch routes for a step of num_microbatches={num_microbatches}: "
            "give one RouteBatch per microbatch"
        )
    routers = session.routers
    if not routers:
        return  # a stage without MoE layers only takes part in the agreement (and its count)
    if not routes:
        raise ValueError("routing mode='replay' needs routes (a RouteBatch or a list of them)")
    for i, batch in enumerate(routes):
        if not isinstance(batch, RouteBatch):
            raise ValueError(f"routes[{i}] is {type(batch).__name__}, expected RouteBatch")
    router = routers[0]
    mtp = getattr(router.config, "mtp_num_layers", None) or 0
    num_moe_layers = sum(moe_layer_pattern(router.config)) + mtp
    if dist.is_initialized():
        if router.tp_group.size() > 1 and not router.config.sequence_parallel:
            facts.tp_key = group_key(router.tp_group)
        facts.shard_key = group_key(router.tp_cp_group)
        if pp_group is not None:
            facts.pp_key = group_key(pp_group)
    own = own_identity(session)
    config = router.config
    pad = config.moe_pad_expert_input_to_capacity and config.moe_expert_capacity_factor
    shapes, digests = [], []
    for microbatch, batch in enumerate(routes):
        if batch.layer_index is not None or batch.num_layers > num_moe_layers:
            # (Fewer canonical columns than MoE layers: session.check names the absent ones.)
            batch.check_layers(num_moe_layers)
        layout = replay_layout(session, microbatch, own)
        session.check(microbatch, layout, router)
        session.cache_shares[microbatch] = cache_share(session, microbatch, layout)
        if facts.tp_key >= 0 or (pad and batch.dropped is not None):
            local = session.decode(microbatch, layout, router, with_cache=False)
            if facts.tp_key >= 0:  # in canonical token order: shards and full routes compare
                order = torch.argsort(layout.token_index)  # indices are [L_local, T_local, k]
                digests.append(_route_digest(local.indices[:, order]))
            if pad and batch.dropped is not None:
                check_capacity(microbatch, local, sorted(routers, key=lambda r: r.moe_layer_id))
        shapes.append((batch.num_tokens, batch.seq_length, _packing(layout)))
    facts.route_digest = stable_hash(*digests)
    facts.shape_digest = stable_hash(*shapes)
    if shapes:
        facts.num_tokens, seq_length, packing = shapes[0]
        facts.seq_length = -1 if seq_length is None else seq_length
        facts.packing = 0 if packing is None else int(packing, 16)


def entry_facts(
    session: RoutingSession,
    pp_group: Any,
    num_microbatches: Optional[int],
    pending: Optional[int],
    model_error: Optional[BaseException] = None,
) -> EntryFacts:
    """This rank's EntryFacts; never raises (its error travels in the facts)."""
    facts = EntryFacts(error=model_error)
    if dist.is_initialized():
        facts.rank = dist.get_rank()
    if session.routes is not None:
        facts.microbatches = len(session.routes)
    facts.pending = -1 if pending is None else pending
    if model_error is None:
        try:
            _check(session, facts, pp_group, num_microbatches)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks
            facts.error = exc
    return facts
