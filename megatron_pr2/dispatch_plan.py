# Ahead-of-time EP dispatch plan for replayed routes: routing(model, "replay", routes,
# dispatch_plan=True) with Megatron-Core's alltoall token dispatcher.
#
# Why: MoEAlltoAllTokenDispatcher.preprocess, once per MoE layer per microbatch, all-gathers the
# layer's tokens_per_expert over the tp_ep group and derives the all-to-all split sizes from it;
# the host then waits for those device values (a DtoH copy plus an event sync at the dispatcher's
# cuda_sync_point) before it can issue the all-to-all. Under replay the routing_map of every
# (microbatch, layer) is a function of the replayed top-k indices (and recorded capacity drops)
# alone, so all of it is known when routing() is entered: one exchange of every count, one copy
# to the host, and each layer's preprocess becomes a table lookup with no collective and no sync.
#
# Shapes (this rank; one DispatchPlan per routing() context):
#   M microbatches of the context, L this rank's PR2 MoE layers (ascending MoE-layer id), E
#   experts, E_local = num_local_experts = E / ep, T_local router rows of one microbatch, k top-k.
#   W = tp x ep ranks of the dispatcher's tp_ep group, in Megatron's order (rank w = ep_i * tp +
#   tp_j, as preprocess reshapes its own gather to [ep, tp, E]).
#   counts     [M, L, E]             this rank's routing_map.sum(0) per (microbatch, layer), from the
#                                    routes decoded once at entry (session.decode); -1 marks a
#                                    (microbatch, layer) that cannot be planned
#   sent       [W, M, L_g, E_local]  ONE all-to-all over tp_ep: rank w gets the counts of ITS local
#                                    experts ([M, L, W, E/ep] in all, never [W, M, L, E]); copied to
#                                    the host once
#   per tp_ep group, vectorised over (microbatch, layer) (_Tables), what preprocess would leave
#   after its DtoH copy: input_splits [M, L, ep], output_splits [M, L, ep], output_splits_tp
#   [M, L, tp] (numpy int64), tokens_per_expert [M, L, E_local], num_out_tokens [M, L],
#   num_global_tokens_per_local_expert [M, L, tp * ep, E_local] (int64; on the device under
#   permute fusion, where the fused sort reads it there).
#
# moe_router_padding_for_quantization (FP8 / FP4): the dispatcher pads each expert's rows of the
# routing_map up to a multiple of the quantization alignment a (pad_routing_map: the first free
# tokens), so a planned count c becomes min(c + (-c mod a), T_local), and the output size is
# dynamic (num_out_tokens from the table), exactly as the stock preprocess sees the padded map.
#
# Binding: the dispatcher of a layer runs right after that layer's router, so the plan entry of a
# preprocess call is the microbatch the router just routed: its forward count, or its recompute
# count when the call runs inside autograd's backward (activation recompute), as session.py binds.
#
# Fallback: a (microbatch, layer) whose routing_map depends on live logits (missing routes under
# missing_route_policy="fallback", or a capacity factor without recorded drops) or whose routes
# failed to decode (the first forward's validation then raises as without the plan) runs the stock
# preprocess. The -1 marker travels in the same all-to-all (to every rank), so every rank of the
# tp_ep group makes the same choice and the stock per-layer gathers stay paired.
#
# Not planned, refused with the reason (ValueError with dispatch_plan=True; a warning and the
# stock path with the default): the allgather and flex (DeepEP / HybridEP) dispatchers (the flex
# dispatcher derives its layout inside the fused dispatch kernel, which has no preprocess to feed),
# pad-to-capacity (static sizes: nothing to plan), CUDA graphs capturing the preprocess.
#
# Scope: the hook is an instance attribute `preprocess` on each PR2 MoE layer's dispatcher, set by
# install() and removed by remove() (routing() calls both, remove() also on error); no global
# state. Every rank of a tp_ep group must enter routing() with the same dispatch_plan value.

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAlltoAllTokenDispatcher,
    MoEFlexTokenDispatcher,
)

from megatron_pr2.compat import cuda_graph_captures_moe_preprocess
from megatron_pr2.model_index import pr2_moe_layers
from megatron_pr2.parallel.collectives import comm_device
from megatron_pr2.profiling import pr2_range
from megatron_pr2.residency import recorded_counts
from megatron_pr2.router import PR2Router
from megatron_pr2.session import RoutingSession

_FLAG = "routing(..., 'replay', dispatch_plan=True)"
# cuda_sync_point / cuda_dtoh_point value that _maybe_dtoh_and_synchronize never matches: no DtoH
# copy on the side stream and no event sync (the plan's values are on the host already).
_NO_SYNC = "no_sync"
_UNPLANNED = -1


class DispatchPlanUnsupported(ValueError):
    """The model's MoE layers cannot be planned (raised before any collective)."""


@dataclass
class _Tables:
    """Preprocess results of every (microbatch, layer) of one tp_ep group (layer axis j)."""

    planned: np.ndarray  # [M, L_g] bool
    num_tokens: List[int]  # [M] T_local the counts were computed for (checked against routing_map)
    input_splits: np.ndarray  # [M, L_g, ep]
    output_splits: np.ndarray  # [M, L_g, ep]
    output_splits_tp: np.ndarray  # [M, L_g, tp]
    tokens_per_expert: torch.Tensor  # [M, L_g, E_local]
    num_out_tokens: torch.Tensor  # [M, L_g]
    global_per_local: torch.Tensor  # [M, L_g, tp * ep, E_local] (device under permute fusion)

    @property
    def nbytes(self) -> int:
        arrays = (self.planned, self.input_splits, self.output_splits, self.output_splits_tp)
        tensors = (self.tokens_per_expert, self.num_out_tokens, self.global_per_local)
        return sum(a.nbytes for a in arrays) + sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _PlannedLayer:
    """One PR2 MoE layer whose dispatcher the plan serves, and what install() replaced."""

    column: int  # position in the plan's L axis
    router: PR2Router
    dispatcher: MoEAlltoAllTokenDispatcher
    pad_multiple: Optional[int] = None  # moe_router_padding_for_quantization alignment
    tables: Optional[_Tables] = None  # of the layer's tp_ep group
    table_column: int = 0  # the layer's j in its group's tables
    stock_preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    saved_instance_attr: Any = None  # an instance-level `preprocess` found at install, if any
    saved_points: Optional[Tuple[str, str]] = None  # (cuda_sync_point, cuda_dtoh_point)


class DispatchPlan:
    """Precomputed alltoall-dispatcher metadata of every (microbatch, layer) of one context."""

    def __init__(
        self, session: RoutingSession, layers: List[_PlannedLayer], exchanges: int, traffic: dict
    ) -> None:
        self.session = session
        self.layers = layers
        self.exchanges = exchanges  # collectives issued to build the plan (one per tp_ep group)
        self.traffic = traffic  # bytes_sent / bytes_received by this rank, table_bytes
        self._installed: List[_PlannedLayer] = []

    def planned(self, microbatch: int, column: int) -> bool:
        layer = self.layers[column]
        return bool(layer.tables.planned[microbatch, layer.table_column])

    # -- hook lifetime -------------------------------------------------------------------------
    def install(self) -> None:
        """Point every planned dispatcher's preprocess at the plan (instance attribute)."""
        for layer in self.layers:
            dispatcher = layer.dispatcher
            layer.saved_instance_attr = dispatcher.__dict__.get("preprocess")
            layer.saved_points = (dispatcher.cuda_sync_point, dispatcher.cuda_dtoh_point)
            layer.stock_preprocess = dispatcher.preprocess
            self._installed.append(layer)
            dispatcher.preprocess = lambda routing_map, layer=layer: self._preprocess(
                layer, routing_map
            )

    def remove(self) -> None:
        """Undo install() (safe after a partial install, and idempotent)."""
        while self._installed:
            layer = self._installed.pop()
            dispatcher = layer.dispatcher
            if layer.saved_instance_attr is None:
                dispatcher.__dict__.pop("preprocess", None)
            else:
                dispatcher.preprocess = layer.saved_instance_attr
            dispatcher.cuda_sync_point, dispatcher.cuda_dtoh_point = layer.saved_points

    # -- the hook --------------------------------------------------------------------------------
    def _preprocess(self, layer: _PlannedLayer, routing_map: torch.Tensor) -> torch.Tensor:
        """MoEAlltoAllTokenDispatcher.preprocess from the plan (same attributes, same values)."""
        dispatcher = layer.dispatcher
        microbatch = self.session.current_microbatch(layer.router)
        if microbatch is None:
            raise RuntimeError(
                f"{_FLAG}: the dispatcher of MoE layer {layer.router.moe_layer_id} ran before "
                "its router in this routing() context"
            )
        tables, j = layer.tables, layer.table_column
        if not tables.planned[microbatch, j]:
            # Stock path, with the sync points it set up itself (a planned call cleared them).
            dispatcher.cuda_sync_point, dispatcher.cuda_dtoh_point = layer.saved_points
            return layer.stock_preprocess(routing_map)
        if routing_map.shape[0] != tables.num_tokens[microbatch]:
            raise RuntimeError(
                f"{_FLAG}: MoE layer {layer.router.moe_layer_id}, microbatch {microbatch}: the "
                f"dispatcher got {routing_map.shape[0]} tokens, the plan was computed for "
                f"{tables.num_tokens[microbatch]} (pass routing(..., layout=) for sharded router "
                "inputs)"
            )
        config = dispatcher.config
        dispatcher.cuda_sync_point = _NO_SYNC
        dispatcher.cuda_dtoh_point = _NO_SYNC
        if config.moe_expert_capacity_factor is None and layer.pad_multiple is None:
            dispatcher.num_out_tokens = routing_map.size(0) * config.moe_router_topk
        else:
            dispatcher.num_out_tokens = tables.num_out_tokens[microbatch, j].clone()
        if dispatcher.ep_size > 1 or dispatcher.tp_size > 1:
            dispatcher.input_splits = tables.input_splits[microbatch, j]
            dispatcher.output_splits = tables.output_splits[microbatch, j]
            dispatcher.output_splits_tp = tables.output_splits_tp[microbatch, j]
        if dispatcher.num_local_experts > 1:
            per_local = tables.global_per_local[microbatch, j]
            dispatcher.num_global_tokens_per_local_expert = (
                per_local if per_local.is_cuda else per_local.clone()
            )
        return tables.tokens_per_expert[microbatch, j].clone()


# -------------------------------------------------------------------------------------------------
# Building the plan
# -------------------------------------------------------------------------------------------------
def _planned_layers(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]], session: RoutingSession
) -> List[_PlannedLayer]:
    """The model's PR2 MoE layers (ascending MoE-layer id); ValueError for what cannot be planned."""
    found = pr2_moe_layers(model)
    orphans = sorted(r.moe_layer_id for r in session.routers if id(r) not in found)
    if orphans:
        raise DispatchPlanUnsupported(
            f"{_FLAG}: PR2 routers of MoE layers {orphans} are not inside an MoELayer of the "
            "model; the plan serves MoELayer token dispatchers. Pass dispatch_plan=False."
        )
    layers = []
    for router in sorted(session.routers, key=lambda r: r.moe_layer_id):
        moe_layer = found[id(router)]
        dispatcher = moe_layer.token_dispatcher
        config = dispatcher.config
        where = f"{_FLAG}: MoE layer {router.moe_layer_id}"
        if isinstance(dispatcher, MoEFlexTokenDispatcher):
            raise DispatchPlanUnsupported(
                f"{where} uses the flex dispatcher (moe_token_dispatcher_type='flex', DeepEP / "
                "HybridEP): it derives its dispatch layout inside the fused dispatch kernel (and "
                "syncs the received counts to the host there), so there is no preprocess to feed "
                "precomputed counts. Replay itself works; pass dispatch_plan=False, or use "
                "'alltoall' to plan."
            )
        if not isinstance(dispatcher, MoEAlltoAllTokenDispatcher) or (
            type(dispatcher).preprocess is not MoEAlltoAllTokenDispatcher.preprocess
        ):
            raise DispatchPlanUnsupported(
                f"{where} uses {type(dispatcher).__name__}; the dispatch plan supports only "
                "Megatron-Core's MoEAlltoAllTokenDispatcher (moe_token_dispatcher_type="
                "'alltoall'). Pass dispatch_plan=False."
            )
        if dispatcher.drop_and_pad:
            raise DispatchPlanUnsupported(
                f"{where}: moe_pad_expert_input_to_capacity=True pads every expert to capacity, "
                "so its dispatch sizes are static and need no exchange; nothing to plan. Pass "
                "dispatch_plan=False."
            )
        if cuda_graph_captures_moe_preprocess(config):
            raise DispatchPlanUnsupported(
                f"{where}: CUDA graphs capture the dispatcher's preprocess (cuda_graph_impl="
                f"{config.cuda_graph_impl!r}), which would freeze the first plan's host values "
                "into the graph. Pass dispatch_plan=False."
            )
        pad = None
        if config.moe_router_padding_for_quantization:
            pad = get_align_size_for_quantization(config)
        layers.append(_PlannedLayer(len(layers), router, dispatcher, pad_multiple=pad))
    return layers


def _local_counts(
    session: RoutingSession, layers: List[_PlannedLayer], num_experts: int
) -> Tuple[torch.Tensor, List[int]]:
    """[M, L, E] int32 routing_map.sum(0) of each (microbatch, layer) for this rank's rows
    (all -1 where a layer cannot be planned) and T_local per microbatch (-1: undecodable).

    From the routes decoded once at entry (shared with the forwards). PR2Router.route builds
    routing_map [T, E] by scattering the replayed top-k [T, k] (RouteBatch rejects duplicate
    experts per row, so one slot is one token of one expert); under a capacity factor only the
    recorded kept slots (~dropped) stay; quantization padding rounds each expert's count up.
    Padding tokens are routed like any other (padding_mask only weights aux losses and
    expert-bias counts), so they count here too.
    """
    num_layers = len(layers)
    capacity = torch.tensor(
        [layer.router.config.moe_expert_capacity_factor is not None for layer in layers]
    )
    pads = [layer.pad_multiple for layer in layers]
    offset = (torch.arange(num_layers, dtype=torch.int32) * num_experts).view(-1, 1, 1)
    counts = torch.full(
        (len(session.routes), num_layers, num_experts), _UNPLANNED, dtype=torch.int32
    )
    num_tokens = []
    layer_ids, any_capacity = session.layer_ids(), bool(capacity.any())
    for m, batch in enumerate(session.routes):
        layout = session.entry_layout(m)
        mine = None  # the batch's own counts where it covers exactly this rank's rows
        if not (any_capacity and batch.has_dropped):  # (recorded drops: kept slots)
            mine = recorded_counts(batch, layout, layer_ids, session.layout is None)
        if mine is not None:
            tokens = layout.token_index.numel()
            num_tokens.append(tokens)
            live = torch.zeros_like(capacity) if batch.has_dropped else capacity.clone()
            _pad_and_mark(mine, live, pads, tokens)
            counts[m] = mine
            continue
        try:
            local = session.decode(m, layout, layers[0].router)
        except ValueError:
            num_tokens.append(-1)  # the first forward's _bind raises on every rank of the stage
            continue
        indices = local.indices  # [L, T_local, k], columns in ascending MoE-layer id = plan's
        tokens = indices.shape[1]
        num_tokens.append(tokens)
        live = torch.zeros(num_layers, dtype=torch.bool)
        if local.has_missing:  # missing tokens take the live top-k
            live |= (indices < 0).flatten(1).any(dim=1)
        if local.dropped is None:  # capacity without recorded drops: live drop decisions
            live |= capacity
        if any_capacity and local.dropped is not None or local.has_missing:
            kept = indices >= 0
            if local.dropped is not None:
                kept &= ~(local.dropped & capacity.view(-1, 1, 1))
            flat = (indices.to(torch.int32) + offset)[kept]
            mine = torch.bincount(flat, minlength=num_layers * num_experts)
            mine = mine.view(num_layers, num_experts).to(torch.int32)
        else:  # every slot counts: one bincount per layer on the narrow ids
            mine = torch.stack(
                [
                    torch.bincount(indices[j].view(-1), minlength=num_experts)
                    for j in range(num_layers)
                ]
            ).to(torch.int32)
        _pad_and_mark(mine, live, pads, tokens)
        counts[m] = mine
    return counts, num_tokens


def _pad_and_mark(
    mine: torch.Tensor, live: torch.Tensor, pads: List[Optional[int]], tokens: int
) -> None:
    """Quantization padding of [L, E] counts (in place), and -1 on the `live` layers."""
    for j, pad in enumerate(pads):
        if pad is not None:  # pad_routing_map: up to a multiple, at most every token
            mine[j] = torch.clamp(mine[j] + (-mine[j]) % pad, max=tokens)
    mine[live] = _UNPLANNED


def _geometry(dispatcher: MoEAlltoAllTokenDispatcher) -> Tuple:
    return (
        dispatcher.ep_size,
        dispatcher.tp_size,
        dispatcher.tp_rank,
        dispatcher.num_experts,
        dispatcher.num_local_experts,
        dispatcher.local_expert_indices[0],
    )


def _exchange(counts: torch.Tensor, dispatcher: MoEAlltoAllTokenDispatcher, traffic: dict):
    """[M, L_g, E] counts of this rank -> [W, M, L_g, E_local]: every rank's counts of this
    rank's local experts, by ONE all_to_all_single over tp_ep (on the host, and on the
    collective's device when that is not the host)."""
    ep, tp, _, num_experts, num_local, _ = _geometry(dispatcher)
    group = dispatcher.tp_ep_group
    num_mb, num_layers = counts.shape[:2]
    # Destination w = ep_i * tp + tp_j gets the counts of EP rank ep_i's experts.
    per_ep = counts.view(num_mb, num_layers, ep, num_local).permute(2, 0, 1, 3)
    send = per_ep.unsqueeze(1).expand(ep, tp, num_mb, num_layers, num_local)
    send = send.reshape(ep * tp, num_mb, num_layers, num_local)
    if group.size() == 1:
        return send, send
    send = send.to(comm_device(group)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    traffic["bytes_sent"] += send.numel() * send.element_size()
    traffic["bytes_received"] += received.numel() * received.element_size()
    # The one device->host copy (and host sync) of the plan.
    return received.cpu(), received


def _tables(
    dispatcher: MoEAlltoAllTokenDispatcher,
    mine: torch.Tensor,
    received: torch.Tensor,
    received_device: torch.Tensor,
    num_tokens: List[int],
    permute_fusion: bool,
) -> _Tables:
    """Preprocess's arithmetic for every (microbatch, layer) of one tp_ep group at once, from
    mine [M, L_g, E] (this rank's counts) and received [W, M, L_g, E_local]."""
    ep, tp, tp_rank, _, num_local, _ = _geometry(dispatcher)
    if received.shape[0] != ep * tp:
        raise RuntimeError(
            f"{_FLAG}: tp_ep group of {received.shape[0]} ranks, expected ep {ep} x tp {tp}"
        )
    num_mb, num_layers = mine.shape[:2]
    planned = ~(received < 0).any(dim=3).any(dim=0)  # [M, L_g]
    # [W, M, L, E_local] -> [ep, tp, M, L, E_local] -> [M, L, tp, ep, E_local]: preprocess's
    # .reshape(ep, tp, E).transpose(0, 1)[:, :, local experts], for every (m, l).
    rx = received.to(torch.int64).clamp(min=0)
    rx = rx.view(ep, tp, num_mb, num_layers, num_local).permute(2, 3, 1, 0, 4)
    per_rank = rx.sum(dim=4)  # [M, L, tp, ep]
    mine64 = mine.to(torch.int64).clamp(min=0)
    global_per_local = rx.reshape(num_mb, num_layers, tp * ep, num_local)
    if permute_fusion:
        # The fused chunk sort reads split sizes on device: keep them there (no host copy).
        dev = received_device.to(torch.int64).clamp(min=0)
        dev = dev.view(ep, tp, num_mb, num_layers, num_local).permute(2, 3, 1, 0, 4)
        global_per_local = dev.reshape(num_mb, num_layers, tp * ep, num_local)
    return _Tables(
        planned=planned.numpy(),
        num_tokens=num_tokens,
        input_splits=mine64.view(num_mb, num_layers, ep, num_local).sum(dim=3).numpy(),
        output_splits=per_rank[:, :, tp_rank].numpy(),
        output_splits_tp=per_rank.sum(dim=3).numpy(),
        tokens_per_expert=rx.sum(dim=(2, 3)),
        num_out_tokens=mine64.sum(dim=2),
        global_per_local=global_per_local,
    )


def build_dispatch_plan(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    session: RoutingSession,
    required: bool = True,
) -> Optional[DispatchPlan]:
    """Validate the model's PR2 MoE layers and precompute every (microbatch, layer) entry.

    required=False (routing()'s default): None when no dispatcher exchanges token counts
    (tp x ep = 1 everywhere), where there is nothing to plan.

    Collective over each dispatcher tp_ep group (one all-to-all per group; Megatron builds one);
    every rank of it must call this (routing() does, at entry) with the same number of
    microbatches and MoE layers. Installs nothing: call install() / remove() on the result.
    """
    with pr2_range("dispatch_plan"):
        if not required:
            dispatchers = [found.token_dispatcher for found in pr2_moe_layers(model).values()]
            if all(
                getattr(d, "tp_ep_group", None) is None or d.tp_ep_group.size() == 1
                for d in dispatchers
            ):
                return None
        layers = _planned_layers(model, session)
        num_experts = layers[0].router.config.num_moe_experts
        counts, num_tokens = _local_counts(session, layers, num_experts)  # [M, L, E]
        groups: Dict[Tuple, List[_PlannedLayer]] = {}
        for layer in layers:  # insertion order = MoE-layer order, identical on every rank
            key = (id(layer.dispatcher.tp_ep_group),) + _geometry(layer.dispatcher)
            groups.setdefault(key, []).append(layer)
        traffic = dict(bytes_sent=0, bytes_received=0, table_bytes=0)
        exchanges = 0
        for members in groups.values():
            mine = counts[:, [layer.column for layer in members]].contiguous()
            dispatcher = members[0].dispatcher
            received, received_device = _exchange(mine, dispatcher, traffic)
            exchanges += int(dispatcher.tp_ep_group.size() > 1)
            fusion = any(layer.dispatcher.config.moe_permute_fusion for layer in members)
            tables = _tables(dispatcher, mine, received, received_device, num_tokens, fusion)
            traffic["table_bytes"] += tables.nbytes
            for j, layer in enumerate(members):
                layer.tables, layer.table_column = tables, j
        return DispatchPlan(session, layers, exchanges, traffic)
