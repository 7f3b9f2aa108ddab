# Ahead-of-time EP dispatch plan for replayed routes: routing(model, "replay", routes,
# dispatch_plan=True) with Megatron-Core's alltoall token dispatcher.
#
# Why: MoEAlltoAllTokenDispatcher.preprocess, once per MoE layer per microbatch, all-gathers the
# layer's tokens_per_expert over the tp_ep group and derives the all-to-all split sizes from it;
# the host then waits for those device values (a DtoH copy plus an event sync at the dispatcher's
# cuda_sync_point) before it can issue the all-to-all. Under replay the routing_map of every
# (microbatch, layer) is a function of the replayed top-k indices (and recorded capacity drops)
# alone, so all of it is known when routing() is entered: one all-gather of every count, one copy
# to the host, and each layer's preprocess becomes a table lookup with no collective and no sync.
#
# Shapes (this rank; one DispatchPlan per routing() context):
#   M microbatches of the context, L this rank's PR2 MoE layers (ascending MoE-layer id), E
#   experts, E_local = num_local_experts, T_local router rows of one microbatch, k top-k.
#   W = tp x ep ranks of the dispatcher's tp_ep group, in Megatron's order: the gathered rows
#   reshape to [ep, tp, ...] exactly as preprocess reshapes its own gather.
#   tokens_per_expert     [M, L, E]           this rank's routing_map.sum(0) per (microbatch, layer);
#                                             -1 marks a (microbatch, layer) that cannot be planned
#   gathered              [W, M, L, E]        after ONE all-gather over tp_ep, copied to CPU once
#   per planned (microbatch, layer), what preprocess would leave after its DtoH copy:
#     input_splits        [ep]                numpy int64 (tokens this rank sends to each EP rank)
#     output_splits       [ep]                numpy int64 (tokens it receives from each EP rank)
#     output_splits_tp    [tp]                numpy int64 (tokens per TP rank of the TP all-gather)
#     num_global_tokens_per_local_expert [tp * ep, E_local]  int64 (CPU; device under permute
#                                             fusion, where the fused sort reads it on device)
#     tokens_per_expert   [E_local]           int64 CPU, preprocess's return value
#     num_out_tokens      0-dim int64 CPU under a capacity factor (dropless: T_local * k)
#
# Binding: the dispatcher of a layer runs right after that layer's router, so the plan entry of a
# preprocess call is the microbatch the router just routed: its forward count, or its recompute
# count when the call runs inside autograd's backward (activation recompute), as context.py binds.
#
# Fallback: a (microbatch, layer) whose routing_map depends on live logits (missing routes under
# missing_route_policy="fallback", or a capacity factor without recorded drops) or whose routes
# failed to decode (the first forward's validation then raises as without the plan) runs the stock
# preprocess. The -1 marker travels in the same all-gather, so every rank of the tp_ep group makes
# the same choice and the stock per-layer gathers stay paired.
#
# Scope: the hook is an instance attribute `preprocess` on each PR2 MoE layer's dispatcher, set by
# install() and removed by remove() (routing() calls both, remove() also on error); no global
# state. Every rank of a tp_ep group must enter routing() with the same dispatch_plan value.

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from megatron.core.transformer.moe import token_dispatcher as _dispatcher_module
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_pr2.compat import cuda_graph_captures_moe_preprocess
from megatron_pr2.model_index import pr2_moe_layers
from megatron_pr2.profiling import pr2_range
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
class _Entry:
    """Preprocess results of one (microbatch, layer), in the types the stock DtoH leaves."""

    num_tokens: int  # T_local the counts were computed for (checked against routing_map)
    tokens_per_expert: torch.Tensor  # [E_local]
    num_out_tokens: Optional[torch.Tensor]  # 0-dim; None: dropless, T_local * k
    input_splits: np.ndarray  # [ep]
    output_splits: np.ndarray  # [ep]
    output_splits_tp: np.ndarray  # [tp]
    num_global_tokens_per_local_expert: torch.Tensor  # [tp * ep, E_local]


@dataclass
class _PlannedLayer:
    """One PR2 MoE layer whose dispatcher the plan serves, and what install() replaced."""

    column: int  # position in the plan's L axis
    router: PR2Router
    dispatcher: MoEAlltoAllTokenDispatcher
    stock_preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    saved_instance_attr: Any = None  # an instance-level `preprocess` found at install, if any
    saved_points: Optional[Tuple[str, str]] = None  # (cuda_sync_point, cuda_dtoh_point)


class DispatchPlan:
    """Precomputed alltoall-dispatcher metadata of every (microbatch, layer) of one context."""

    def __init__(
        self,
        session: RoutingSession,
        layers: List[_PlannedLayer],
        entries: Dict[Tuple[int, int], _Entry],
        exchanges: int,
    ) -> None:
        self.session = session
        self.layers = layers
        self.entries = entries
        self.exchanges = exchanges  # all-gathers issued to build the plan (one per tp_ep group)
        self._installed: List[_PlannedLayer] = []

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
        entry = self.entries.get((microbatch, layer.column))
        if entry is None:
            # Stock path, with the sync points it set up itself (a planned call cleared them).
            dispatcher.cuda_sync_point, dispatcher.cuda_dtoh_point = layer.saved_points
            return layer.stock_preprocess(routing_map)
        if routing_map.shape[0] != entry.num_tokens:
            raise RuntimeError(
                f"{_FLAG}: MoE layer {layer.router.moe_layer_id}, microbatch {microbatch}: the "
                f"dispatcher got {routing_map.shape[0]} tokens, the plan was computed for "
                f"{entry.num_tokens} (pass routing(..., layout=) for sharded router inputs)"
            )
        dispatcher.cuda_sync_point = _NO_SYNC
        dispatcher.cuda_dtoh_point = _NO_SYNC
        if entry.num_out_tokens is None:
            dispatcher.num_out_tokens = routing_map.size(0) * dispatcher.config.moe_router_topk
        else:
            dispatcher.num_out_tokens = entry.num_out_tokens
        if dispatcher.ep_size > 1 or dispatcher.tp_size > 1:
            dispatcher.input_splits = entry.input_splits
            dispatcher.output_splits = entry.output_splits
            dispatcher.output_splits_tp = entry.output_splits_tp
        if dispatcher.num_local_experts > 1:
            dispatcher.num_global_tokens_per_local_expert = entry.num_global_tokens_per_local_expert
        return entry.tokens_per_expert


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
        if config.moe_router_padding_for_quantization:
            raise DispatchPlanUnsupported(
                f"{where}: moe_router_padding_for_quantization=True pads the routing_map inside "
                "the dispatcher; the dispatch plan does not model it. Pass dispatch_plan=False."
            )
        if cuda_graph_captures_moe_preprocess(config):
            raise DispatchPlanUnsupported(
                f"{where}: CUDA graphs capture the dispatcher's preprocess (cuda_graph_impl="
                f"{config.cuda_graph_impl!r}), which would freeze the first plan's host values "
                "into the graph. Pass dispatch_plan=False."
            )
        layers.append(_PlannedLayer(len(layers), router, dispatcher))
    return layers


def _local_tokens_per_expert(
    session: RoutingSession, microbatch: int, layers: List[_PlannedLayer], num_experts: int
) -> Tuple[torch.Tensor, int]:
    """[L, E] int64 routing_map.sum(0) of each layer for this rank's rows of one microbatch
    (rows of _UNPLANNED for layers that cannot be planned) and T_local (-1 if undecodable).

    PR2Router.route builds routing_map [T, E] by scattering the replayed top-k [T, k] (RouteBatch
    rejects duplicate experts per row, so one slot is one token of one expert); under a capacity
    factor only the recorded kept slots (~dropped) stay. Padding tokens are routed like any other
    token (padding_mask only weights aux losses and expert-bias counts), so they count here too.
    """
    unplanned = torch.full((len(layers), num_experts), _UNPLANNED, dtype=torch.int64)
    try:
        local = session.decode(
            microbatch, session.entry_layout(microbatch), layers[0].router, with_cache=False
        )
    except ValueError:
        return unplanned, -1  # the first forward's _bind raises on every rank of the stage
    columns = [local.columns[layer.router.moe_layer_id] for layer in layers]
    indices = local.indices[:, columns].to(torch.int64)  # [T_local, L, k]
    kept = indices >= 0
    capacity = torch.tensor(
        [layer.router.config.moe_expert_capacity_factor is not None for layer in layers]
    )
    if bool(capacity.any()) and local.dropped is not None:
        dropped = local.dropped[:, columns].bool()
        kept &= ~(dropped & capacity.view(1, -1, 1))
    offset = torch.arange(len(layers), dtype=torch.int64).view(1, -1, 1) * num_experts
    counts = torch.bincount((indices + offset)[kept], minlength=len(layers) * num_experts)
    counts = counts.view(len(layers), num_experts)
    # Live decisions: missing tokens get the live top-k; capacity without recorded drops drops
    # tokens by live probabilities.
    live = (indices < 0).any(dim=2).any(dim=0)
    if local.dropped is None:
        live |= capacity
    counts[live] = _UNPLANNED
    return counts, int(indices.shape[0])


def _geometry(dispatcher: MoEAlltoAllTokenDispatcher) -> Tuple:
    return (
        dispatcher.ep_size,
        dispatcher.tp_size,
        dispatcher.tp_rank,
        dispatcher.num_experts,
        dispatcher.num_local_experts,
        dispatcher.local_expert_indices[0],
    )


def _exchange(counts: torch.Tensor, group: Any, device: torch.device) -> torch.Tensor:
    """[M, L_g, E] counts of this rank -> [W, M, L_g, E] of the tp_ep group, on CPU.

    The same all-gather preprocess issues per layer (looked up in the dispatcher's module, so
    anything wrapping it there sees this call too), once for all layers and microbatches; int32
    halves its bytes (counts are bounded by T_local * k).
    """
    if group.size() == 1:
        return counts.unsqueeze(0), counts.unsqueeze(0).to(device)
    payload = counts.to(device=device, dtype=torch.int32)
    gathered = _dispatcher_module.gather_from_sequence_parallel_region(payload, group=group)
    gathered = gathered.view(group.size(), *counts.shape)
    # The one device->host copy (and host sync) of the plan.
    return gathered.cpu().to(torch.int64), gathered


def _entries_of_group(
    layers: List[_PlannedLayer],
    mine: torch.Tensor,
    gathered: torch.Tensor,
    gathered_device: torch.Tensor,
    num_tokens: List[int],
) -> Dict[Tuple[int, int], _Entry]:
    """Preprocess's arithmetic for every (microbatch, layer) of one tp_ep group at once.

    mine [M, L_g, E] and gathered [W, M, L_g, E] (CPU int64); gathered_device the same on the
    collective's device (used only under moe_permute_fusion).
    """
    dispatcher = layers[0].dispatcher
    ep, tp, tp_rank, num_experts, num_local, first = _geometry(dispatcher)
    if gathered.shape[0] != ep * tp:
        raise RuntimeError(
            f"{_FLAG}: tp_ep group of {gathered.shape[0]} ranks, expected ep {ep} x tp {tp}"
        )
    num_mb, num_layers = mine.shape[:2]
    unplanned = (gathered < 0).any(dim=3).any(dim=0)  # [M, L_g]

    def per_local_expert(g: torch.Tensor) -> torch.Tensor:
        # [W, M, L, E] -> [ep, tp, M, L, E] -> [M, L, tp, ep, E_local]: preprocess's
        # .reshape(ep, tp, E).transpose(0, 1)[:, :, local experts], for every (m, l).
        g = g.view(ep, tp, num_mb, num_layers, num_experts).permute(2, 3, 1, 0, 4)
        return g[..., first : first + num_local]

    global_local = per_local_expert(gathered.clamp(min=0))
    per_rank = global_local.sum(dim=4)  # [M, L, tp, ep]
    output_splits = per_rank[:, :, tp_rank].numpy()  # [M, L, ep]
    output_splits_tp = per_rank.sum(dim=3).numpy()  # [M, L, tp]
    tokens_per_local_expert = global_local.sum(dim=(2, 3))  # [M, L, E_local]
    # [M, L, tp * ep, E_local], rows tp-major as preprocess's .view(-1, num_local_experts).
    global_tokens = global_local.reshape(num_mb, num_layers, tp * ep, num_local)
    input_splits = mine.clamp(min=0).view(num_mb, num_layers, ep, num_local).sum(dim=3).numpy()
    num_out_tokens = mine.sum(dim=2)  # [M, L]
    if any(layer.dispatcher.config.moe_permute_fusion for layer in layers):
        # The fused chunk sort reads split sizes on device: slice them there (no host copy).
        device_tokens = per_local_expert(gathered_device.to(torch.int64))
        global_tokens_device = device_tokens.reshape(num_mb, num_layers, tp * ep, num_local)
    entries = {}
    for m in range(num_mb):
        for j, layer in enumerate(layers):
            if bool(unplanned[m, j]):
                continue
            config = layer.dispatcher.config
            # (moe_router_padding_for_quantization, the other dynamic case, is refused above.)
            dynamic_out = config.moe_expert_capacity_factor is not None
            global_per_local = (
                global_tokens_device[m, j]
                if config.moe_permute_fusion
                else global_tokens[m, j].clone()
            )
            entries[(m, layer.column)] = _Entry(
                num_tokens=num_tokens[m],
                tokens_per_expert=tokens_per_local_expert[m, j].clone(),
                num_out_tokens=num_out_tokens[m, j].clone() if dynamic_out else None,
                input_splits=input_splits[m, j].copy(),
                output_splits=output_splits[m, j].copy(),
                output_splits_tp=output_splits_tp[m, j].copy(),
                num_global_tokens_per_local_expert=global_per_local,
            )
    return entries


def build_dispatch_plan(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    session: RoutingSession,
    required: bool = True,
) -> Optional[DispatchPlan]:
    """Validate the model's PR2 MoE layers and precompute every (microbatch, layer) entry.

    required=False (routing()'s default): None when no dispatcher exchanges token counts
    (tp x ep = 1 everywhere), where the plan would only decode the routes a second time.

    Collective over each dispatcher tp_ep group (one all-gather per group; Megatron builds one);
    every rank of it must call this (routing() does, at entry) with the same number of
    microbatches and MoE layers. Installs nothing: call install() / remove() on the result.
    """
    with pr2_range("dispatch_plan"):
        layers = _planned_layers(model, session)
        if not required and all(layer.dispatcher.tp_ep_group.size() == 1 for layer in layers):
            return None
        num_experts = layers[0].router.config.num_moe_experts
        per_mb = [
            _local_tokens_per_expert(session, m, layers, num_experts)
            for m in range(len(session.routes))
        ]
        counts = torch.stack([c for c, _ in per_mb])  # [M, L, E]
        num_tokens = [t for _, t in per_mb]
        groups: Dict[Tuple, List[_PlannedLayer]] = {}
        for layer in layers:  # insertion order = MoE-layer order, identical on every rank
            key = (id(layer.dispatcher.tp_ep_group),) + _geometry(layer.dispatcher)
            groups.setdefault(key, []).append(layer)
        entries: Dict[Tuple[int, int], _Entry] = {}
        exchanges = 0
        for members in groups.values():
            columns = [layer.column for layer in members]
            mine = counts[:, columns].contiguous()
            group = members[0].dispatcher.tp_ep_group
            device = members[0].router.weight.device
            gathered, gathered_device = _exchange(mine, group, device)
            exchanges += int(group.size() > 1)
            entries.update(_entries_of_group(members, mine, gathered, gathered_device, num_tokens))
        return DispatchPlan(session, layers, entries, exchanges)
