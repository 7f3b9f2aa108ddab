# RoutingSession: the state of one routing() context: which microbatch each router call
# belongs to, the routes it replays (decoded and validated once per microbatch), and what it
# recorded. It answers the routers' questions (`ask`) and stores their records (`save`); it
# never routes and never calls back into a router.
#
# Shapes: T_local router rows of one microbatch on this rank (flattened [s, b], sequence-major),
# k top-k, E experts, H hidden; C cached tokens; L_local MoE layers of this rank.
#
# Routes are bound to microbatches, never to a global FIFO: the n-th forward of a router inside a
# context is microbatch n, and the n-th activation recompute of that router (a forward that runs
# inside autograd's backward: Megatron's full and selective recompute) is again microbatch n.
# This holds for every Megatron-Core schedule (no pipelining, 1F1B, interleaved), which run the
# backward passes of one model chunk in forward order.
#
# Memory (residency.py): replayed routes are decoded once per context on the host and are on the
# device only while their microbatch is in flight; records go to the host as they are made.

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megatron_pr2.config import PR2Config
from megatron_pr2.model_index import router_layout
from megatron_pr2.parallel.collectives import raise_on_any_rank
from megatron_pr2.records import assemble_record, host_record, record_cache_rows
from megatron_pr2.residency import (
    HostRoutes,
    Residency,
    cache_torch_dtype,
    decode_host,
    reorder_rows,
)
from megatron_pr2.router import PR2Router, Recorded, RouteAnswer
from megatron_pr2.routes import RouteBatch, TokenLayout, narrowest_int_dtype
from megatron_pr2.telemetry import METRIC_NAMES, LayerStats

MODES = ("off", "record", "predict_record", "replay")


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. for activation recompute forwards."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _RouterState:
    forward_calls: int = 0
    recompute_calls: int = 0
    recorded: List[Recorded] = field(default_factory=list)  # host copies (records.host_record)
    stats: LayerStats = field(default_factory=LayerStats)
    column: int = 0  # the router's column in this rank's decoded routes (ascending MoE-layer id)


class RoutingSession:
    """State of one `routing()` context, shared by all PR2 routers of the model."""

    def __init__(
        self,
        mode: str,
        routers: List[PR2Router],
        routes: Optional[List[RouteBatch]],
        ministep: int,
        layout: Optional[TokenLayout],
        cache_mask: Optional[List[torch.Tensor]] = None,
    ) -> None:
        self.mode = mode
        self.routers = routers
        self.routes = routes
        self.ministep = ministep
        self.layout = layout
        self.cache_mask = cache_mask
        self.states: Dict[int, _RouterState] = {id(r): _RouterState() for r in routers}
        by_layer = sorted(routers, key=lambda r: r.moe_layer_id)
        for column, router in enumerate(by_layer):
            self.states[id(router)].column = column
        self._layer_ids = [r.moe_layer_id for r in by_layer]
        self._layouts: Dict[int, TokenLayout] = {}
        self._entry_layouts: Dict[int, TokenLayout] = {}
        self._full_layouts: Dict[tuple, TokenLayout] = {}
        # predict_record: cached router rows per microbatch, on the device until every router
        # has recorded it, on the host for the handle.
        self._cache_rows: Dict[int, torch.Tensor] = {}
        self._record_rows: Dict[int, torch.Tensor] = {}
        # Replay: every microbatch decoded once (host, with its layout); bound by _bind.
        self._decoded: Dict[int, Tuple[TokenLayout, HostRoutes]] = {}
        self._local: Dict[int, HostRoutes] = {}
        self._cuda_records = False
        self.residency: Optional[Residency] = None
        if routes is not None:
            host = lambda m: self._local.get(m) or self._decoded.get(m, (0, None))[1]  # noqa
            dtype = cache_torch_dtype(routers[0].pr2_config)
            self.residency = Residency(len(routes), host, dtype)

    # -- per-microbatch views ------------------------------------------------------------------
    def _splits_tokens(self) -> bool:
        # Ranks of one microbatch route different tokens: context parallelism, or tensor
        # parallelism with sequence parallelism (TP peers without it route the same tokens).
        router = self.routers[0]
        tp_split = router.config.sequence_parallel and router.tp_group.size() > 1
        return tp_split or router.cp_group.size() > 1

    def _group_layout(self, microbatch: int, batch: RouteBatch) -> TokenLayout:
        """This rank's tokens of full (canonical) routes, from the routers' process groups."""
        if batch.seq_length is None:
            raise ValueError(
                f"microbatch {microbatch}: full routes replayed under sequence or context "
                "parallelism need RouteBatch.seq_length (to cut this rank's tokens), or pass "
                "routing(layout=megatron_pr2.local_layout(model, ...))"
            )
        batch_size = batch.num_tokens // batch.seq_length
        return router_layout(self.routers[0], batch_size, batch.seq_length)

    def entry_layout(self, microbatch: int) -> TokenLayout:
        """The tokens this rank routes in a replayed microbatch, known before its forward:
        routing(layout=), else a sharded RouteBatch's own token_index, else this rank's share of
        a full RouteBatch (all of its tokens unless SP / CP split them: sequence-major [S, B]
        when seq_length is known, else canonical order, which a B > 1 forward reorders)."""
        if self.layout is not None:
            return self.layout
        layout = self._entry_layouts.get(microbatch)
        if layout is not None:
            return layout
        batch = self.routes[microbatch]
        if batch.token_index is not None:
            layout = TokenLayout(batch.token_index, batch.num_tokens, batch.seq_length)
        elif self._splits_tokens():
            layout = self._group_layout(microbatch, batch)
        elif batch.seq_length and batch.num_tokens % batch.seq_length == 0:
            # The forward's own row order ([S, B] sequence-major), so its decode is this one.
            layout = self._full_layout(batch.seq_length, batch.num_tokens // batch.seq_length)
        else:
            layout = self._full_layout(batch.num_tokens, 1)  # canonical order 0..T-1
        self._entry_layouts[microbatch] = layout
        return layout

    def _full_layout(self, seq_length: int, batch_size: int) -> TokenLayout:
        """TokenLayout.full, one object per shape (the same object at entry and forward)."""
        key = (seq_length, batch_size)
        if key not in self._full_layouts:
            self._full_layouts[key] = TokenLayout.full(seq_length, batch_size)
        return self._full_layouts[key]

    def _layout_for(self, microbatch: int, hidden: torch.Tensor) -> TokenLayout:
        layout = self._layouts.get(microbatch)
        if layout is None:
            rows = hidden.shape[0] * hidden.shape[1]
            replayed = self.routes is not None
            if self.layout is not None or (
                replayed
                and (self._splits_tokens() or self.routes[microbatch].token_index is not None)
            ):
                layout = self.entry_layout(microbatch)
            elif self._splits_tokens():
                # Recording under SP / CP: the full sequence is this rank's share times the split.
                router = self.routers[0]
                tp = router.tp_group.size() if router.config.sequence_parallel else 1
                seq_length = hidden.shape[0] * tp * router.cp_group.size()
                layout = router_layout(router, hidden.shape[1], seq_length)
            else:
                layout = self._full_layout(hidden.shape[0], hidden.shape[1])
            if layout.token_index.numel() != rows:
                raise ValueError(
                    f"microbatch {microbatch}: the router sees {rows} tokens "
                    f"(input {tuple(hidden.shape[:2])}) but the route layout has "
                    f"{layout.token_index.numel()}"
                )
            self._layouts[microbatch] = layout
        return layout

    def decode(
        self, microbatch: int, layout: TokenLayout, router: PR2Router, with_cache: bool = True
    ) -> HostRoutes:
        """Decode and validate one microbatch's routes for this rank's router rows, once per
        context (entry, dispatch plan and first forward share it; the cache is never copied
        here, so with_cache=False, for callers that only count or validate, costs the same)."""
        batch = self.routes[microbatch]
        if batch.topk != router.topk or batch.num_experts != router.config.num_moe_experts:
            raise ValueError(
                f"microbatch {microbatch}: route has k={batch.topk}, num_experts="
                f"{batch.num_experts}; the model routes top-{router.topk} of "
                f"{router.config.num_moe_experts}"
            )
        if batch.token_index is None and batch.num_tokens != layout.num_tokens:
            raise ValueError(
                f"microbatch {microbatch}: route has {batch.num_tokens} tokens, the microbatch "
                f"has {layout.num_tokens}"
            )
        held = self._decoded.get(microbatch)
        if held is None or held[0] is not layout:
            if held is not None and layout.is_full() and held[0].is_full():
                # Same tokens, another row order (B > 1 full routes: canonical at entry).
                local = reorder_rows(held[1], held[0], layout, batch)
            else:
                local = self._decode(microbatch, layout, router)
            held = self._decoded[microbatch] = (layout, local)
        return held[1]

    def decode_all(self) -> None:
        """routing() entry: decode every microbatch once. A microbatch that fails is left for
        its first forward, whose _bind raises on every rank of the stage."""
        for microbatch in range(len(self.routes)):
            try:
                self.decode(microbatch, self.entry_layout(microbatch), self.routers[0])
            except ValueError:
                pass

    def _decode(self, microbatch: int, layout: TokenLayout, router: PR2Router) -> HostRoutes:
        batch = self.routes[microbatch]
        has_missing = _check_missing(batch, microbatch, router.pr2_config)
        dtype = torch.int16 if has_missing else narrowest_int_dtype(batch.num_experts)
        # Rows in the batch's own order (one unsharded sequence, a shard on its own layout).
        own = self._full_layouts.get((batch.num_tokens, 1)) if batch.token_index is None else None
        same_rows = layout is own or layout.token_index is batch.token_index
        local = decode_host(
            batch, layout, self._layer_ids, microbatch, dtype, router.weight.is_cuda, same_rows
        )
        local.has_missing = has_missing
        return local

    def _bind(self, router: PR2Router, microbatch: int, hidden: torch.Tensor) -> None:
        """Decode microbatch routes once, and make every rank of the stage agree they are valid.

        Runs at the first router call of a microbatch, a point every rank of the pipeline stage
        reaches in the same order. A rank with a bad shard would otherwise raise alone and leave
        its peers blocked in the dispatcher's collectives; one small all-reduce over the stage's
        ranks (tp x dp x cp, which contains the expert-parallel group) makes all of them raise.
        Tensor-parallel ranks without sequence parallelism route the same tokens, so their routes
        must be identical: a digest comparison catches a mismatch before dispatch does.
        """
        error, local = None, None
        try:
            layout = self._layout_for(microbatch, hidden)
            local = self.decode(microbatch, layout, router)
        except ValueError as exc:
            error = exc
        tp_group = router.tp_group
        if tp_group.size() > 1 and not router.config.sequence_parallel:
            # Every TP rank joins (a failed decode with the sentinel digest -1; real digests are
            # >= 0); a mismatch then goes through the stage-wide agreement below, so the DP / CP
            # peers raise too instead of waiting in the dispatcher.
            digest = _route_digest(local.indices) if local is not None else torch.tensor(-1)
            extremes = torch.stack([digest, -digest]).to(hidden.device)
            torch.distributed.all_reduce(
                extremes, op=torch.distributed.ReduceOp.MAX, group=tp_group
            )
            if error is None and int(extremes[0]) != -int(extremes[1]):
                error = ValueError(
                    f"microbatch {microbatch}: tensor-parallel ranks hold different routes; "
                    "without sequence parallelism they route the same tokens and must replay "
                    "identical routes"
                )
        raise_on_any_rank(
            error,
            router.tp_dp_cp_group,
            f"microbatch {microbatch}: another rank of this pipeline stage rejected its routes "
            "(see that rank's error)",
            device=hidden.device,
        )
        if local.cache_rows is not None:
            mine = total = float(local.cache_rows.numel())
            # Ranks holding different tokens of this microbatch: TP x CP under sequence
            # parallelism, CP alone otherwise (TP peers then route the same tokens).
            shards = router.tp_cp_group if router.config.sequence_parallel else router.cp_group
            if torch.distributed.is_initialized() and shards.size() > 1:
                count = torch.tensor([mine], dtype=torch.float64, device=hidden.device)
                torch.distributed.all_reduce(count, group=shards)
                total = float(count)
            local.cache_share = mine / total if total > 0 else 0.0
        self._local[microbatch] = local  # host; residency.py uploads it while in flight

    def agree_on_entry(self, group) -> None:
        """Validate every microbatch's routes before any forward and raise on every rank of
        `group` (e.g. the pipeline group, or all ranks of the step) if any rank's are invalid."""
        error = None
        try:
            for microbatch in range(len(self.routes)):
                # Full routes: the token count is checked at the first forward.
                self.decode(
                    microbatch, self.entry_layout(microbatch), self.routers[0], with_cache=False
                )
        except ValueError as exc:
            error = exc
        raise_on_any_rank(
            error,
            group,
            "routing(replay): another rank of the group rejected its routes (see that rank's "
            "error)",
        )

    def current_microbatch(self, router: PR2Router) -> Optional[int]:
        """The microbatch `router` routed last in this context (its forward, or inside autograd's
        backward its recompute), None before its first call: what a hook running after the
        router in the same layer (the token dispatcher) belongs to."""
        state = self.states[id(router)]
        calls = state.recompute_calls if _in_backward() else state.forward_calls
        return calls - 1 if calls else None

    # -- the routers' questions --------------------------------------------------------------
    def ask(self, router: PR2Router, hidden: torch.Tensor) -> RouteAnswer:
        """What `router` does with its current call (router input `hidden` [S_local, B, H])."""
        state = self.states[id(router)]
        recompute = _in_backward()
        if recompute:
            microbatch = state.recompute_calls
            state.recompute_calls += 1
            if microbatch >= state.forward_calls:
                raise RuntimeError(
                    f"MoE layer {router.moe_layer_id}: activation recompute of microbatch "
                    f"{microbatch}, which never ran forward in this routing() context"
                )
        else:
            microbatch = state.forward_calls
            state.forward_calls += 1
        answer = RouteAnswer(microbatch, recompute, state.stats)
        if self.mode != "replay":
            layout = self._layout_for(microbatch, hidden)
            if recompute:
                # The record went to the host at the forward; back for the recompute.
                done = state.recorded[microbatch]
                answer.target = done.top_indices.to(hidden.device, non_blocking=True)
                if done.dropped is not None:
                    answer.dropped = done.dropped.to(hidden.device, non_blocking=True)
            elif self.mode == "predict_record":
                answer.cache_rows = self._record_cache_rows(microbatch, layout, router, hidden)
            return answer

        if microbatch >= len(self.routes):
            raise RuntimeError(
                f"MoE layer {router.moe_layer_id}: forward of microbatch {microbatch} but "
                f"routing(..., 'replay') was given routes for {len(self.routes)} microbatches"
            )
        if microbatch not in self._local:
            self._bind(router, microbatch, hidden)
        local, column, config = self._local[microbatch], state.column, router.pr2_config
        on_device = self.residency.take(microbatch, column, hidden.device)
        answer.target = on_device.indices[column]
        answer.dropped = None if on_device.dropped is None else on_device.dropped[column]
        answer.fill_missing = local.has_missing
        answer.telemetry = config.telemetry and not recompute
        if local.has_cache:
            answer.cache_rows = on_device.cache_rows
            answer.cache_hidden = on_device.cache_hidden[column]
            answer.cache_logits = on_device.cache_logits[column]
            answer.cache_share = local.cache_share
            answer.train_predictor = (
                self.ministep >= config.loss_start_ministep and router.predictor_trainable
            )
        last = microbatch == len(self.routes) - 1
        answer.keep_predictor_grads = (
            last and router.predictor_trainable and not answer.train_predictor
        )
        self.residency.consumed(microbatch, column)  # the answer (and autograd) hold the rest
        return answer

    def save(self, router: PR2Router, record: Recorded) -> None:
        """Keep what `router` recorded for its latest forward (microbatch order), on the host."""
        state = self.states[id(router)]
        self._cuda_records |= record.top_indices.is_cuda
        state.recorded.append(host_record(router, record))
        if all(len(self.states[id(r)].recorded) >= len(state.recorded) for r in self.routers):
            self._cache_rows.pop(len(state.recorded) - 1, None)  # every router has recorded it

    def _record_cache_rows(
        self, microbatch: int, layout: TokenLayout, router: PR2Router, hidden: torch.Tensor
    ) -> torch.Tensor:
        # The cached router rows of a microbatch, on the hidden states' device, computed once
        # for all layers (a CPU index would be copied per layer). One cache density per model:
        # recorded_routes uses the first router's too.
        rows = self._cache_rows.get(microbatch)
        if rows is None:
            config = router.pr2_config
            rows = record_cache_rows(layout, config, self.cache_mask, microbatch)
            self._record_rows[microbatch] = rows  # host, for the handle's RouteBatch
            rows = self._cache_rows[microbatch] = rows.to(hidden.device)
        return rows

    # -- results -------------------------------------------------------------------------------
    def layer_ids(self) -> List[int]:
        return sorted(r.moe_layer_id for r in self.routers)

    def release(self) -> None:
        """routing() exit: drop replayed routes (host, device); records and telemetry stay."""
        if self.residency is not None:
            self.residency.release_all()
        self._decoded.clear()
        self._local.clear()
        self._cache_rows.clear()

    def close(self) -> None:
        """Check that every route was consumed exactly once per router."""
        if self.mode != "replay":
            counts = {self.states[id(r)].forward_calls for r in self.routers}
            if len(counts) > 1:
                raise RuntimeError(f"routers recorded different numbers of microbatches: {counts}")
            return
        for router in self.routers:
            calls = self.states[id(router)].forward_calls
            if calls != len(self.routes):
                raise RuntimeError(
                    f"MoE layer {router.moe_layer_id} ran {calls} forward passes but "
                    f"{len(self.routes)} microbatch routes were given: "
                    f"{len(self.routes) - calls} left unconsumed"
                )

    def recorded_routes(self) -> List[RouteBatch]:
        """One RouteBatch per recorded microbatch (canonical order when this rank saw it all)."""
        routers = sorted(self.routers, key=lambda r: r.moe_layer_id)
        calls = self.states[id(routers[0])].forward_calls
        if self._cuda_records:
            torch.cuda.synchronize()  # once: the records' non_blocking copies to the host
        return [
            assemble_record(
                routers,
                [self.states[id(r)].recorded[m] for r in routers],
                self._layouts[m],
                self._record_rows.get(m),
            )
            for m in range(calls)
        ]

    def metrics(self) -> Dict[str, torch.Tensor]:
        """Per-layer means over the replayed tokens: name -> [L_local] (NaN where not measured)."""
        routers = sorted(self.routers, key=lambda r: r.moe_layer_id)
        out = {}
        for name in METRIC_NAMES:
            values = [self.states[id(router)].stats.mean(name) for router in routers]
            out[name] = torch.tensor(values, dtype=torch.float64)
        return out


def _check_missing(batch: RouteBatch, microbatch: int, config: PR2Config) -> bool:
    """True if some (token, layer) has no route; raises unless the policy is "fallback"."""
    missing = batch.missing
    if missing is None:
        return False
    if config.missing_route_policy == "error":
        row, column = (int(v) for v in torch.nonzero(missing)[0])
        raise ValueError(
            f"microbatch {microbatch}: {int(missing.sum())} (token, layer) pairs have no route, "
            f"first at row {row}, layer column {column} (PR2Config.missing_route_policy='error')"
        )
    return True


def _route_digest(indices: torch.Tensor) -> torch.Tensor:
    """Position-sensitive int64 checksum of a route tensor (to compare ranks cheaply)."""
    flat = indices.reshape(-1).to(torch.int64) + 2
    weights = torch.arange(flat.numel(), dtype=torch.int64) % 65521 + 1
    return (flat * weights).sum()
