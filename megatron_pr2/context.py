# routing(model, mode, routes=None): the one switch between stock routing, recording and replay.
#
# Shapes: T_local router rows of one microbatch on this rank (flattened [s, b], sequence-major),
# k top-k, E experts, H hidden; C cached tokens; L_local MoE layers of this rank.
#
# Routes are bound to microbatches, never to a global FIFO: the n-th forward of a router inside a
# context is microbatch n, and the n-th activation recompute of that router (a forward that runs
# inside autograd's backward: Megatron's full and selective recompute) is again microbatch n.
# This holds for every Megatron-Core schedule (no pipelining, 1F1B, interleaved), which run the
# backward passes of one model chunk in forward order. All state lives on the session object the
# context hands to the model's routers and drops on exit.

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from megatron_pr2.collectives import raise_on_any_rank
from megatron_pr2.config import PR2Config, stride_for
from megatron_pr2.predictor import predictor_loss
from megatron_pr2.profiling import pr2_range
from megatron_pr2.router import PR2Router
from megatron_pr2.routes import PredictorCache, RouteBatch, TokenLayout
from megatron_pr2.sharding import moe_layer_pattern

MODES = ("off", "record", "predict_record", "replay")
METRIC_NAMES = (
    "route_topk_accuracy",
    "flip_rate",
    "r2_topk_accuracy",
    "predictive_topk_accuracy",
    "predictor_loss",
    "bias_to_logit_ratio",
)


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. for activation recompute forwards."""
    return torch._C._current_graph_task_id() != -1


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[...] number of experts two [..., k] top-k index sets share."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(dim=-1).sum(dim=-1)


def cache_rows(layout: TokenLayout, cache_tokens_per_sequence: int) -> torch.Tensor:
    """Router rows whose tokens the predictor cache keeps: a fixed stride along each sequence."""
    stride = stride_for(layout.seq_length, cache_tokens_per_sequence)
    if stride is None:
        return torch.zeros(0, dtype=torch.int64)
    position = layout.token_index % layout.seq_length
    return torch.nonzero(position % stride == 0).squeeze(1)


@dataclass
class _Recorded:
    """What one router recorded for one microbatch (router row order)."""

    top_indices: torch.Tensor
    dropped: Optional[torch.Tensor]
    hidden: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


@dataclass
class _LocalRoutes:
    """One microbatch's routes decoded for this rank's router rows (shared by its routers)."""

    indices: torch.Tensor  # [T_local, L, k]
    dropped: Optional[torch.Tensor]  # [T_local, L, k]
    columns: Dict[int, int]  # global MoE-layer id -> column
    cache_rows: Optional[torch.Tensor] = None  # [C_local] router rows of cached tokens
    cache_hidden: Optional[torch.Tensor] = None  # [C_local, L, H]
    cache_logits: Optional[torch.Tensor] = None  # [C_local, L, E]
    has_missing: bool = False  # some (token, layer) has no route (fallback policy only)
    cache_share: Optional[float] = None  # C_local / C of the microbatch (token-sharding ranks)

    def to(self, device: torch.device) -> "_LocalRoutes":
        """Move every tensor to `device` once per microbatch (not once per layer)."""
        for name in ("indices", "dropped", "cache_rows", "cache_hidden", "cache_logits"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device, non_blocking=True))
        return self


@dataclass
class _RouterState:
    forward_calls: int = 0
    recompute_calls: int = 0
    recorded: List[_Recorded] = field(default_factory=list)
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, count: int) -> None:
        # Device tensors accumulate without a host sync; metrics() converts once at the end.
        value = value.detach().double() * count
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + count


@functools.lru_cache(maxsize=64)
def telemetry_rows(num_rows: int, stride: int, device: torch.device) -> Optional[torch.Tensor]:
    """Sorted uniform sample of ceil(num_rows / stride) router rows, fixed per (rows, stride);
    None for stride 1. Random rather than every n-th row: rows are sequence-major (s * B + b),
    so a plain stride sharing a factor with B would only ever sample some of the sequences."""
    if stride == 1:
        return None
    generator = torch.Generator().manual_seed(num_rows)
    rows = torch.randperm(num_rows, generator=generator)[: -(-num_rows // stride)]
    return rows.sort().values.to(device)


class RoutingSession:
    """State of one `routing()` context, shared by all PR2 routers of the model."""

    def __init__(
        self,
        mode: str,
        routers: List[PR2Router],
        routes: Optional[List[RouteBatch]],
        ministep: int,
        layout: Optional[TokenLayout],
    ) -> None:
        self.mode = mode
        self.routers = routers
        self.routes = routes
        self.ministep = ministep
        self.layout = layout
        self.states: Dict[int, _RouterState] = {id(r): _RouterState() for r in routers}
        self._layouts: Dict[int, TokenLayout] = {}
        # predict_record: the cached router rows of each microbatch, on the hidden states'
        # device, computed once for all layers (a CPU index would be copied per layer).
        self._cache_rows: Dict[int, torch.Tensor] = {}
        self._local: Dict[int, _LocalRoutes] = {}

    # -- per-microbatch views ------------------------------------------------------------------
    def entry_layout(self, microbatch: int) -> TokenLayout:
        """The tokens this rank routes in a replayed microbatch, known before its forward:
        routing(layout=), else a sharded RouteBatch's own token_index, else all of its tokens
        (in canonical order: the row order of full routes comes from the forward's input shape,
        see _layout_for; validation and token counts do not depend on it)."""
        if self.layout is not None:
            return self.layout
        batch = self.routes[microbatch]
        token_index = batch.token_index
        if token_index is None:
            token_index = torch.arange(batch.num_tokens)
        return TokenLayout(token_index, batch.num_tokens, batch.seq_length or batch.num_tokens)

    def _layout_for(self, microbatch: int, hidden: torch.Tensor) -> TokenLayout:
        layout = self._layouts.get(microbatch)
        if layout is None:
            rows = hidden.shape[0] * hidden.shape[1]
            sharded = self.routes is not None and self.routes[microbatch].token_index is not None
            if self.layout is not None or sharded:
                layout = self.entry_layout(microbatch)
            else:
                layout = TokenLayout.full(hidden.shape[0], hidden.shape[1])
            if layout.token_index.numel() != rows:
                raise ValueError(
                    f"microbatch {microbatch}: the router sees {rows} tokens "
                    f"(input {tuple(hidden.shape[:2])}) but the route layout has "
                    f"{layout.token_index.numel()}"
                )
            self._layouts[microbatch] = layout
        return layout

    def _decode(
        self, microbatch: int, layout: TokenLayout, router: PR2Router, with_cache: bool = True
    ) -> _LocalRoutes:
        """Decode and validate one microbatch's routes for this rank's router rows; with_cache
        False skips the predictor cache (for callers that only count or validate routes)."""
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
        rows = batch.rows_for(layout.token_index)
        layer_ids = batch.layer_index
        if layer_ids is None:
            layer_ids = torch.arange(batch.num_layers)
        expected = {r.moe_layer_id for r in self.routers}
        absent = sorted(expected - set(layer_ids.tolist()))
        if absent:
            raise ValueError(f"microbatch {microbatch}: route has no MoE layers {absent}")
        dropped = batch.dropped
        local = _LocalRoutes(
            indices=batch.indices[rows],
            dropped=None if dropped is None else dropped[rows],
            columns={int(layer): col for col, layer in enumerate(layer_ids.tolist())},
        )
        local.has_missing = _check_missing(batch, microbatch, router.pr2_config)
        if batch.cache is not None and with_cache:
            position = torch.full((layout.num_tokens,), -1, dtype=torch.int64)
            position[layout.token_index] = torch.arange(layout.token_index.numel())
            cached_rows = position[batch.cache.token_index]
            here = cached_rows >= 0
            local.cache_rows = cached_rows[here]
            local.cache_hidden, local.cache_logits = batch.cache.hidden, batch.cache.logits
            if not bool(here.all()):  # boolean indexing copies: only when some rows are not here
                local.cache_hidden, local.cache_logits = (
                    local.cache_hidden[here],
                    local.cache_logits[here],
                )
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
            local = self._decode(microbatch, layout, router)
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
            mine = float(local.cache_rows.numel())
            count = torch.tensor([mine], dtype=torch.float64, device=hidden.device)
            # Ranks holding different tokens of this microbatch: TP x CP under sequence
            # parallelism, CP alone otherwise (TP peers then route the same tokens).
            shards = router.tp_cp_group if router.config.sequence_parallel else router.cp_group
            if torch.distributed.is_initialized() and shards.size() > 1:
                torch.distributed.all_reduce(count, group=shards)
            local.cache_share = mine / float(count) if float(count) > 0 else 0.0
        self._local[microbatch] = local.to(hidden.device)

    def agree_on_entry(self, group) -> None:
        """Validate every microbatch's routes before any forward and raise on every rank of
        `group` (e.g. the pipeline group, or all ranks of the step) if any rank's are invalid."""
        error = None
        try:
            for microbatch in range(len(self.routes)):
                # Full routes: the token count is checked at the first forward.
                self._decode(
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

    # -- the router hook -------------------------------------------------------------------------
    def route(self, router: PR2Router, hidden, logits, padding_mask):
        """Route one microbatch through `router` according to the session's mode."""
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
        if self.mode == "replay" and microbatch >= len(self.routes):
            raise RuntimeError(
                f"MoE layer {router.moe_layer_id}: forward of microbatch {microbatch} but "
                f"routing(..., 'replay') was given routes for {len(self.routes)} microbatches"
            )
        if self.mode == "replay" and microbatch not in self._local:
            self._bind(router, microbatch, hidden)
        layout = self._layout_for(microbatch, hidden)
        args = (router, state, microbatch, layout, hidden, logits, padding_mask, recompute)
        if self.mode == "replay":
            with pr2_range("replay"):
                return self._replay(*args)
        with pr2_range("record"):
            return self._record(*args)

    def _record(
        self, router, state, microbatch, layout, hidden, effective, padding_mask, recompute
    ):
        # `effective`: live logits ("record"), or live logits + predictor offset ("predict_record").
        if recompute:
            done = state.recorded[microbatch]
            probs, routing_map, _, _ = router.route(
                effective, padding_mask, done.top_indices, done.dropped
            )
            return probs, routing_map
        probs, routing_map, top_indices, dropped = router.route(effective, padding_mask)
        record = _Recorded(top_indices.detach(), None if dropped is None else dropped.detach())
        if self.mode == "predict_record":
            rows = self._cache_rows.get(microbatch)
            if rows is None:
                # One cache density per model: recorded_routes uses the first router's too.
                rows = cache_rows(layout, router.pr2_config.cache_tokens_per_sequence)
                rows = self._cache_rows[microbatch] = rows.to(hidden.device)
            cached_hidden = hidden.reshape(-1, hidden.shape[-1])[rows].detach()
            # p_old (without the predictor) of the cached rows; a rank may hold none of them.
            p_old = effective.new_zeros(0, effective.shape[-1])
            if rows.numel():
                with torch.no_grad():
                    p_old = router.gating(cached_hidden)
            record.logits = p_old.float()
            record.hidden = cached_hidden.float()
        state.recorded.append(record)
        return probs, routing_map

    def _replay(self, router, state, microbatch, layout, hidden, logits, padding_mask, recompute):
        local = self._local[microbatch]
        column = local.columns[router.moe_layer_id]
        target = local.indices[:, column]
        flat_logits = logits.reshape(-1, logits.shape[-1])
        live = None
        if local.has_missing:
            # missing_route_policy="fallback" (bind rejected missing routes otherwise).
            live = router.live_topk(flat_logits)
            target = torch.where(target < 0, live, target)
        dropped = None if local.dropped is None else local.dropped[:, column]
        probs, routing_map, _, _ = router.route(logits, padding_mask, target, dropped)

        config = router.pr2_config
        cached = local.cache_rows is not None and local.cache_rows.numel() > 0
        train_predictor = (
            cached and self.ministep >= config.loss_start_ministep and router.predictor_trainable
        )
        telemetry = config.telemetry and not recompute
        loss = None
        if cached and (train_predictor or telemetry):
            old_hidden = local.cache_hidden[:, column]
            old_logits = local.cache_logits[:, column]
            live_cached = flat_logits[local.cache_rows].detach()
            # Before loss_start_ministep the loss is only reported: no graph for it.
            with torch.set_grad_enabled(train_predictor and torch.is_grad_enabled()):
                offset = router.predictor_offset(old_hidden)
                loss = predictor_loss(config.loss, live_cached, old_logits, offset)
        if router.training and torch.is_grad_enabled():
            if train_predictor:
                # The objective is the mean over the microbatch's cached tokens; this rank holds
                # C_local of C (sequence / context parallel shards), and Megatron sums
                # sequence-parallel grads over TP: weight the local mean by C_local / C.
                probs = router.attach_predictor_loss(probs, loss * local.cache_share)
            elif router.predictor_trainable:
                probs = router.attach_zero_predictor_grad(probs)

        if telemetry:
            with torch.no_grad():
                rows = telemetry_rows(target.shape[0], config.telemetry_stride, target.device)
                if live is None:
                    live = router.live_topk(flat_logits if rows is None else flat_logits[rows])
                elif rows is not None:
                    live = live[rows]
                overlap = topk_overlap(target if rows is None else target[rows], live)
                tokens = len(overlap)
                state.add("route_topk_accuracy", overlap.float().mean() / router.topk, tokens)
                state.add("flip_rate", (overlap < router.topk).float().mean(), tokens)
                if cached:
                    live_top = router.live_topk(live_cached)
                    r2_top = router.live_topk(old_logits)
                    predicted_top = router.live_topk(old_logits + offset.detach())
                    n = len(live_top)
                    r2_accuracy = topk_overlap(r2_top, live_top).float().mean() / router.topk
                    predictive = topk_overlap(predicted_top, live_top).float().mean() / router.topk
                    ratio = offset.detach().abs().mean() / old_logits.abs().mean().clamp(min=1e-12)
                    state.add("r2_topk_accuracy", r2_accuracy, n)
                    state.add("predictive_topk_accuracy", predictive, n)
                    state.add("predictor_loss", loss, n)
                    state.add("bias_to_logit_ratio", ratio, n)
        return probs, routing_map

    # -- results -------------------------------------------------------------------------------
    def layer_ids(self) -> List[int]:
        return sorted(r.moe_layer_id for r in self.routers)

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
        layer_ids = torch.tensor([r.moe_layer_id for r in routers], dtype=torch.int64)
        config = routers[0].config
        all_layers = torch.equal(layer_ids, torch.arange(sum(moe_layer_pattern(config))))
        out = []
        for microbatch in range(self.states[id(routers[0])].forward_calls):
            records = [self.states[id(r)].recorded[microbatch] for r in routers]
            layout = self._layouts[microbatch]
            indices = torch.stack([rec.top_indices for rec in records], dim=1).cpu()
            dropped = None
            if records[0].dropped is not None:
                dropped = torch.stack([rec.dropped for rec in records], dim=1).cpu()
            cache = None
            if records[0].hidden is not None:
                rows = cache_rows(layout, routers[0].pr2_config.cache_tokens_per_sequence)
                cache = PredictorCache(
                    token_index=layout.token_index[rows],
                    hidden=torch.stack([rec.hidden for rec in records], dim=1).cpu(),
                    logits=torch.stack([rec.logits for rec in records], dim=1).cpu(),
                )
            token_index = layout.token_index
            if layout.is_full():
                # This rank saw every token: store rows in canonical order.
                order = torch.argsort(token_index)
                indices = indices[order]
                dropped = None if dropped is None else dropped[order]
                token_index = None
            out.append(
                RouteBatch(
                    indices,
                    config.num_moe_experts,
                    dropped=dropped,
                    token_index=token_index,
                    layer_index=None if all_layers else layer_ids,
                    num_tokens=layout.num_tokens,
                    seq_length=layout.seq_length,
                    cache=cache,
                )
            )
        return out

    def metrics(self) -> Dict[str, torch.Tensor]:
        """Per-layer means over the replayed tokens: name -> [L_local] (NaN where not measured)."""
        routers = sorted(self.routers, key=lambda r: r.moe_layer_id)
        out = {}
        for name in METRIC_NAMES:
            values = []
            for router in routers:
                state = self.states[id(router)]
                count = state.counts.get(name, 0)
                values.append(float(state.sums[name]) / count if count else float("nan"))
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


class RoutingHandle:
    """What `routing()` yields: recorded routes and replay telemetry of the context."""

    def __init__(self, session: RoutingSession) -> None:
        self._session = session

    @property
    def mode(self) -> str:
        return self._session.mode

    @property
    def routes_per_microbatch(self) -> List[RouteBatch]:
        """Recorded routes, one RouteBatch per microbatch in forward order."""
        if self._session.mode not in ("record", "predict_record"):
            raise ValueError(
                f"routes are recorded only in 'record'/'predict_record', not {self.mode!r}"
            )
        return self._session.recorded_routes()

    @property
    def routes(self) -> RouteBatch:
        """The recorded RouteBatch of the context's single microbatch."""
        routes = self.routes_per_microbatch
        if len(routes) != 1:
            raise ValueError(
                f"{len(routes)} microbatches were recorded; use .routes_per_microbatch"
            )
        return routes[0]

    @property
    def layer_ids(self) -> List[int]:
        """Global MoE-layer ids of this rank's routers, the order of every metric tensor."""
        return self._session.layer_ids()

    @property
    def metrics(self) -> Dict[str, torch.Tensor]:
        """Replay telemetry: name -> float64 tensor [L_local] (see METRIC_NAMES)."""
        return self._session.metrics()


@dataclass
class _ChunkIndex:
    """The PR2 routers of one model chunk, and the MoE layer holding each (by id(router))."""

    routers: List[PR2Router]
    moe_layers: Dict[int, torch.nn.Module]


_INDEX_OF_CHUNK: "weakref.WeakKeyDictionary[torch.nn.Module, _ChunkIndex]" = (
    weakref.WeakKeyDictionary()
)


def _chunk_indices(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> List[_ChunkIndex]:
    """One module walk per chunk, cached (a weak reference, so nothing outlives the model):
    walking a 100B model's modules on every routing() entry costs milliseconds."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    indices = []
    for chunk in chunks:
        index = _INDEX_OF_CHUNK.get(chunk)
        if index is None:
            modules = list(chunk.modules())
            index = _ChunkIndex(
                routers=[m for m in modules if isinstance(m, PR2Router)],
                moe_layers={
                    id(m.router): m
                    for m in modules
                    # An MoELayer (or subclass) by its parts: importing the class here would pull
                    # the dispatchers into `import megatron_pr2`.
                    if isinstance(getattr(m, "router", None), PR2Router)
                    and hasattr(m, "token_dispatcher")
                },
            )
            _INDEX_OF_CHUNK[chunk] = index
        indices.append(index)
    return indices


def pr2_routers(model: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> List[PR2Router]:
    """All PR2 routers of a model or a list of model chunks (virtual pipeline stages)."""
    return [router for index in _chunk_indices(model) for router in index.routers]


def pr2_moe_layers(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
) -> Dict[int, torch.nn.Module]:
    """id(router) -> the MoE layer holding that PR2 router (routers outside one are absent)."""
    return {k: v for index in _chunk_indices(model) for k, v in index.moe_layers.items()}


@contextmanager
def routing(
    model: Union[torch.nn.Module, Sequence[torch.nn.Module]],
    mode: str,
    routes: Optional[Union[RouteBatch, Sequence[RouteBatch]]] = None,
    *,
    ministep: int = 1,
    layout: Optional[TokenLayout] = None,
    group: Optional[torch.distributed.ProcessGroup] = None,
    dispatch_plan: Optional[bool] = None,
) -> Iterator[RoutingHandle]:
    """Route the model's PR2 routers in `mode` for the forward/backward passes inside the block.

    mode: "off" (stock TopKRouter), "record" (R2: record live top-k), "predict_record" (PR2:
    route and record with live logits + predictor offset, cache (h_old, p_old)), "replay"
    (replay `routes`, one RouteBatch per microbatch in forward order).
    ministep: 1-based mini-step of the rollout batch; the predictor loss joins the backward pass
    from PR2Config.loss_start_ministep on.
    layout: which canonical tokens this rank routes (sharded layouts; default: all of them).
    group: replay only; a process group whose ranks all enter this context (e.g. the world, or
    the pipeline group). Every microbatch's routes are validated on entry and, if any rank's are
    invalid, every rank of the group raises before the first forward. Without it, validation
    is agreed per microbatch among the ranks of a pipeline stage (tp x dp x cp), which cannot
    reach the other stages of a pipeline.
    dispatch_plan: replay only. Precompute the alltoall dispatcher's tokens_per_expert and
    all-to-all split sizes of every (microbatch, MoE layer) from the replayed routes at entry,
    exchanged in ONE all-gather over the dispatcher's tp_ep group, so each MoE layer's
    preprocess issues no per-layer gather and no device->host sync (dispatch_plan.py).
    None (default): on in replay wherever it applies and a dispatcher exchanges token counts
    (tp x ep > 1; measured faster: benchmarks/README.md), off otherwise. True: on, and a ValueError for non-alltoall dispatchers,
    moe_pad_expert_input_to_capacity, moe_router_padding_for_quantization and CUDA graphs that
    capture the dispatcher's preprocess. False: the stock per-layer path. Every rank of a
    tp_ep group must pass the same value. A (microbatch, layer) that depends on live logits
    (missing routes under the "fallback" policy, a capacity factor without recorded drops)
    runs the stock preprocess either way.
    """
    if mode not in MODES:
        raise ValueError(f"routing mode={mode!r}: must be one of {MODES}")
    if not isinstance(ministep, int) or ministep < 1:
        raise ValueError(f"routing ministep={ministep!r}: must be an integer >= 1")
    if dispatch_plan and mode != "replay":
        raise ValueError(f"routing dispatch_plan=True needs mode='replay', not {mode!r}")
    if isinstance(routes, RouteBatch):
        routes = [routes]
    if mode == "replay":
        if not routes:
            raise ValueError("routing mode='replay' needs routes (a RouteBatch or a list of them)")
        for i, batch in enumerate(routes):
            if not isinstance(batch, RouteBatch):
                raise ValueError(f"routes[{i}] is {type(batch).__name__}, expected RouteBatch")
    elif routes is not None:
        raise ValueError(f"routing mode={mode!r} takes no routes (only 'replay' does)")
    routers = pr2_routers(model)
    if not routers and mode != "off":
        raise ValueError("the model has no PR2 routers: build its layer spec with apply_pr2()")
    layer_ids = [r.moe_layer_id for r in routers]
    if len(set(layer_ids)) != len(layer_ids):
        raise ValueError(
            f"routers share MoE-layer ids {sorted(layer_ids)}: build MoE layers inside "
            "TransformerLayers (or call MoELayer.set_layer_number) so each has its own"
        )
    if any(r.session is not None for r in routers):
        raise RuntimeError("routing() contexts cannot nest on the same model")
    session = RoutingSession(mode, routers, list(routes) if routes else None, ministep, layout)
    if mode == "replay" and group is not None:
        # Pipeline peers never meet in the stage agreement of _bind: agree before any forward.
        session.agree_on_entry(group)
    plan = None
    if mode == "replay" and dispatch_plan is not False:
        # Imported here: dispatch_plan imports this module. Collective over tp_ep (after the
        # support checks, so an unsupported model issues none); installs nothing.
        from megatron_pr2.dispatch_plan import DispatchPlanUnsupported, build_dispatch_plan

        try:
            plan = build_dispatch_plan(model, session, required=bool(dispatch_plan))
        except DispatchPlanUnsupported:
            if dispatch_plan:
                raise
    for router in routers:
        if mode == "predict_record":
            router.refresh_lookahead()
        router.session = session
    try:
        if plan is not None:
            plan.install()
        yield RoutingHandle(session)
        # Only reached when the block did not raise: never mask the block's own error.
        session.close()
    finally:
        if plan is not None:
            plan.remove()
        for router in routers:
            router.session = None
