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

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from megatron_pr2.model_index import router_layout
from megatron_pr2.parallel.sharding import describe_layouts
from megatron_pr2.records import (
    assemble_records,
    host_record,
    microbatch_cache_tokens,
    record_cache_rows,
)
from megatron_pr2.residency import (
    HostRoutes,
    Residency,
    cache_torch_dtype,
    check_missing,
    decode_host,
    decode_many,
    own_rows,
    reorder_rows,
)
from megatron_pr2.route_answer import Recorded, RouteAnswer
from megatron_pr2.router import PR2Router
from megatron_pr2.routes import RouteBatch, TokenLayout, narrowest_int_dtype, shared_full_layout
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
        stage: Tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None),
    ) -> None:
        self.mode = mode
        self.routers = routers
        self.routes = routes
        self.ministep = ministep
        self.layout = layout
        self.cache_mask = cache_mask
        self.stage = stage  # (pp_rank, pp_size, vp_size) of the model, None where unknown
        # Replay: C_local / C of each microbatch's predictor cache, set by the entry check
        # (entry_check.py) from the layouts, so binding needs no collective.
        self.cache_shares: Dict[int, float] = {}
        self._cached_tokens: Dict[int, int] = {}  # C of each recorded microbatch (split layouts)
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
        # No cache_mask: cached rows depend on the layout only (held here: its id stays unique).
        self._rows_of_layout: Dict[int, Tuple[torch.Tensor, torch.Tensor, Optional[int]]] = {}
        self._saved: Dict[int, int] = {}  # microbatch -> routers that recorded it
        # Replay: every microbatch decoded once (host, with its layout); bound by _bind.
        self._decoded: Dict[int, Tuple[TokenLayout, HostRoutes]] = {}
        self._checked: Dict[int, Tuple[TokenLayout, Optional[torch.Tensor]]] = {}  # check's rows
        self._local: Dict[int, HostRoutes] = {}
        self._predecoded: Dict[int, torch.Tensor] = {}  # decode_all's joint decode, until used
        self._cuda_records = False
        self.residency: Optional[Residency] = None
        if routes is not None and routers:  # a dense stage only joins the agreement
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
        return self.router_layout(batch_size, batch.seq_length)

    def _sequence_split(self) -> int:
        """Ranks sharing one sequence's tokens: TP under sequence parallelism times CP."""
        router = self.routers[0]
        tp = router.tp_group.size() if router.config.sequence_parallel else 1
        return tp * router.cp_group.size()

    def router_layout(self, batch_size: int, seq_length: int) -> TokenLayout:
        """This rank's layout from its routers' process groups, with its pipeline stage."""
        layout = router_layout(self.routers[0], batch_size, seq_length)
        return replace(layout, identity=layout.identity.with_stage(*self.stage))

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
            # routing() has checked the shard against this rank's own layout (entry_check.py).
            identity = None if batch.identity is None else batch.identity.layout
            layout = TokenLayout(batch.token_index, batch.num_tokens, batch.seq_length, identity)
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
            self._full_layouts[key] = shared_full_layout(seq_length, batch_size)
        return self._full_layouts[key]

    def _layout_for(self, microbatch: int, hidden: torch.Tensor) -> TokenLayout:
        layout = self._layouts.get(microbatch)
        if layout is None:
            rows = hidden.shape[0] * hidden.shape[1]
            replayed = self.routes is not None
            if replayed and hidden.shape[1] > 1 and self.routes[microbatch].seq_length:
                # The input shape is known only now: routes of [S=8, B=2] must not replay on
                # [S=4, B=4]. (One packed THD row, B = 1, may hold several recorded rows.)
                seq_length = hidden.shape[0] * self._sequence_split()
                self.routes[microbatch].check_tokens(seq_length, hidden.shape[1])
            if self.layout is not None or (
                replayed
                and (self._splits_tokens() or self.routes[microbatch].token_index is not None)
            ):
                layout = self.entry_layout(microbatch)
            elif self._splits_tokens():
                # Recording under SP / CP: the full sequence is this rank's share times the split.
                seq_length = hidden.shape[0] * self._sequence_split()
                layout = self.router_layout(hidden.shape[1], seq_length)
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

    def check(
        self, microbatch: int, layout: TokenLayout, router: PR2Router
    ) -> Optional[torch.Tensor]:
        """Validate one microbatch's routes for this rank's router rows `layout` without decoding
        the ids (the entry check runs it on every rank before the agreement). Returns (and keeps
        for the decode) the batch's rows of the layout's tokens, None for its own rows."""
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
        seq = layout.seq_length
        own = self._full_layouts.get((seq, layout.num_tokens // seq)) if seq else None
        try:
            if own_rows(batch, layout):
                rows = None
            elif batch.token_index is None and layout is own:
                rows = layout.token_index  # canonical rows are token ids; own holds 0..T-1
            else:
                rows = batch.rows_for(layout.token_index)
        except ValueError as exc:
            why = f"microbatch {microbatch}: {exc}{describe_layouts(batch, layout)}"
            raise ValueError(why) from exc
        index = batch.layer_index
        present = range(batch.num_layers) if index is None else index.tolist()
        absent = sorted({r.moe_layer_id for r in self.routers}.difference(present))
        if absent:
            raise ValueError(f"microbatch {microbatch}: route has no MoE layers {absent}")
        check_missing(batch, microbatch, router.pr2_config)
        self._checked[microbatch] = (layout, rows)
        return rows

    def decode(
        self, microbatch: int, layout: TokenLayout, router: PR2Router, with_cache: bool = True
    ) -> HostRoutes:
        """Decode and validate one microbatch's routes for this rank's router rows, once per
        context (entry, dispatch plan and first forward share it; with_cache: the same cost)."""
        batch = self.routes[microbatch]
        held = self._decoded.get(microbatch)
        if held is None or held[0] is not layout:
            checked, rows = self._checked.pop(microbatch, (None, None))
            if checked is not layout:  # (else the entry's check of this layout found `rows`)
                rows = self.check(microbatch, layout, router)
                del self._checked[microbatch]
            if held is not None and layout.is_full() and held[0].is_full():
                # Same tokens, another row order (B > 1 full routes: canonical at entry).
                local = reorder_rows(held[1], held[0], layout, batch)
            else:
                local = self._decode(microbatch, layout, router, rows)
            held = self._decoded[microbatch] = (layout, local)
        return held[1]

    def decode_all(self) -> None:
        """routing() entry, after the agreement validated every microbatch on every rank:
        decode each once (the dispatch plan and the forwards share it)."""
        self._predecoded = dict(enumerate(decode_many(self.routes) or []))
        for microbatch in range(len(self.routes)):
            self.decode(microbatch, self.entry_layout(microbatch), self.routers[0])
        self._predecoded = {}

    def _decode(
        self, microbatch: int, layout: TokenLayout, router: PR2Router, rows: Optional[torch.Tensor]
    ) -> HostRoutes:
        batch = self.routes[microbatch]
        has_missing = check_missing(batch, microbatch, router.pr2_config)
        dtype = torch.int16 if has_missing else narrowest_int_dtype(batch.num_experts)
        # Rows in the batch's own order (one unsharded sequence, a shard on its own layout).
        own = self._full_layouts.get((batch.num_tokens, 1)) if batch.token_index is None else None
        same_rows = layout is own or layout.token_index is batch.token_index
        pin = router.weight.is_cuda
        decoded = self._predecoded.pop(microbatch, None)  # (decode_all: all at once)
        args = (batch, layout, self._layer_ids, microbatch, dtype, pin, same_rows, rows, decoded)
        local = decode_host(*args)
        local.has_missing = has_missing
        return local

    def _bind(self, router: PR2Router, microbatch: int, hidden: torch.Tensor) -> None:
        """Bind one microbatch's decoded routes at its first router call. routing() validated
        them at entry and agreed over every rank of the step (entry_check.py, agreement.py), so
        no collective and no host read of a device value happens here."""
        local = self.decode(microbatch, self._layout_for(microbatch, hidden), router)
        local.cache_share = self.cache_shares.get(microbatch, 1.0)
        self._local[microbatch] = local  # host; residency.py uploads it while in flight

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
        microbatch = len(state.recorded) - 1
        saved = self._saved[microbatch] = self._saved.get(microbatch, 0) + 1
        if saved == len(self.routers):
            self._cache_rows.pop(microbatch, None)  # every router has recorded it

    def _record_cache_rows(
        self, microbatch: int, layout: TokenLayout, router: PR2Router, hidden: torch.Tensor
    ) -> torch.Tensor:
        # The cached router rows of a microbatch, on the hidden states' device, computed once
        # for all layers (a CPU index would be copied per layer). One cache density per model:
        # recorded_routes uses the first router's too.
        rows = self._cache_rows.get(microbatch)
        if rows is not None:
            return rows
        held = self._rows_of_layout.get(id(layout)) if self.cache_mask is None else None
        if held is None or held[1].device != hidden.device:
            config = router.pr2_config
            shared = any(layout is full for full in self._full_layouts.values())
            host = record_cache_rows(layout, config, self.cache_mask, microbatch, shared)
            total = None
            if not layout.is_full():  # a shard records C of the whole microbatch (identity)
                eligible = None if self.cache_mask is None else self.cache_mask[microbatch]
                total = microbatch_cache_tokens(layout, config.cache_tokens_per_sequence, eligible)
            held = (host, host.to(hidden.device), total)
            if self.cache_mask is None:
                self._rows_of_layout[id(layout)] = held
        host, rows, total = held
        self._record_rows[microbatch] = host  # host, for the handle's RouteBatch
        if total is not None:
            self._cached_tokens[microbatch] = total
        self._cache_rows[microbatch] = rows
        return rows

    # -- results -------------------------------------------------------------------------------
    def layer_ids(self) -> List[int]:
        return sorted(r.moe_layer_id for r in self.routers)

    def release(self) -> None:
        """routing() exit: drop replayed routes (host, device); records and telemetry stay."""
        if self.residency is not None:
            self.residency.release_all()
        self._decoded.clear()
        self._checked.clear()
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
        return assemble_records(
            routers,
            [[self.states[id(r)].recorded[m] for r in routers] for m in range(calls)],
            [self._layouts[m] for m in range(calls)],
            [self._record_rows.get(m) for m in range(calls)],
            [self._cached_tokens.get(m) for m in range(calls)],
        )

    def metrics(self) -> Dict[str, torch.Tensor]:
        """Per-layer means over the replayed tokens: name -> [L_local] (NaN where not measured)."""
        routers = sorted(self.routers, key=lambda r: r.moe_layer_id)
        out = {}
        for name in METRIC_NAMES:
            values = [self.states[id(router)].stats.mean(name) for router in routers]
            out[name] = torch.tensor(values, dtype=torch.float64)
        return out
