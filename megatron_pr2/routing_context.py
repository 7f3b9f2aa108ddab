# routing(model, mode, routes=None): the one switch between stock routing, recording and replay.
#
#   off             every PR2 router is Megatron's stock TopKRouter
#   record          R2: route with the live logits and record top-k (and capacity drops)
#   predict_record  PR2: route with live logits + predictor offset, record, cache (h_old, p_old)
#   replay          replay one RouteBatch per microbatch (forward order); train the predictor
#
# The context builds one RoutingSession (session.py) and hands it to every PR2 router of the
# model; all state lives on that session and drops on exit. The handle it yields gives the
# recorded routes and the replay telemetry. Replay starts with the entry agreement
# (entry_check.py validates this rank's routes, agreement.py agrees over every rank of the step).

import functools
import logging
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from megatron_pr2.agreement import agree, step_groups
from megatron_pr2.dispatch_plan import DispatchPlanUnsupported, build_dispatch_plan
from megatron_pr2.entry_check import entry_facts
from megatron_pr2.model_index import Model, has_moe_layer, model_group, model_stage, pr2_routers
from megatron_pr2.router import PR2Router
from megatron_pr2.routes import RouteBatch, TokenLayout
from megatron_pr2.session import MODES, RoutingSession


@functools.lru_cache(maxsize=16)
def _warn_unplanned(reason: str) -> None:
    # Once per process and reason: every routing() entry of the run would repeat it.
    logging.getLogger(__name__).warning(
        "routing(replay): no dispatch plan, each MoE layer's preprocess exchanges counts and "
        "syncs the host as in stock Megatron-Core. Reason: %s",
        reason,
    )


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


@contextmanager
def routing(
    model: Model,
    mode: str,
    routes: Optional[Union[RouteBatch, Sequence[RouteBatch]]] = None,
    *,
    ministep: int = 1,
    layout: Optional[TokenLayout] = None,
    group: Optional[torch.distributed.ProcessGroup] = None,
    dispatch_plan: Optional[bool] = None,
    cache_mask: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
    num_microbatches: Optional[int] = None,
    pending_routes: Optional[int] = None,
) -> Iterator[RoutingHandle]:
    """Route the model's PR2 routers in `mode` for the forward/backward passes inside the block.

    mode: "off" (stock TopKRouter), "record" (R2: record live top-k), "predict_record" (PR2:
    route and record with live logits + predictor offset, cache (h_old, p_old)), "replay"
    (replay `routes`, one RouteBatch per microbatch in forward order).
    ministep: 1-based mini-step of the rollout batch; the predictor loss joins the backward pass
    from PR2Config.loss_start_ministep on.
    layout: which canonical tokens this rank routes (default: this rank's share, from the
    routers' process groups; needed for packed THD routes that are not cut for the rank yet).
    Replay entry agreement: before anything else, every microbatch's routes are validated for
    this rank (its layout from the routers' process groups, shard identities, k, E, tokens, MoE
    layers, capacity) and one small all-gather over every rank of the step (PP x TP x DP x CP,
    which holds EP; from Megatron's process groups, agreement.py) makes every rank raise the same
    RouteError naming the failing rank and its problem, or the ranks' disagreement (microbatch
    counts, TP peers' routes, microbatch shapes). Every rank of the step must enter routing() in
    replay, a pipeline stage without MoE layers too (its model has no PR2 routers: it only joins).
    group: replay only; agree over this process group instead of the one derived from the model.
    num_microbatches: replay only; the schedule's microbatch count, checked in the agreement (a
    forward beyond the routes, or routes left over, would otherwise fail mid-step on one stage).
    pending_routes: replay only (pr2_step): routes the caller keeps for later calls of the same
    step, agreed like the count.
    dispatch_plan: replay only. Precompute the alltoall dispatcher's tokens_per_expert and
    all-to-all split sizes of every (microbatch, MoE layer) from the replayed routes at entry,
    exchanged in ONE all-to-all over the dispatcher's tp_ep group (each rank receives the counts
    of its own experts), so each MoE layer's preprocess issues no per-layer gather and no
    device->host sync (dispatch_plan.py; FP8 routing-map padding included).
    None (default): on in replay wherever a dispatcher exchanges token counts (tp x ep > 1;
    measured faster: benchmarks/README.md), off otherwise; a model it cannot plan (allgather or
    flex / DeepEP dispatchers, moe_pad_expert_input_to_capacity, CUDA graphs that capture the
    dispatcher's preprocess) runs the stock path with a warning that says why. True: on, and a
    ValueError with that reason instead. False: the stock per-layer path. Every rank of a
    tp_ep group must pass the same value. A (microbatch, layer) that depends on live logits
    (missing routes under the "fallback" policy, a capacity factor without recorded drops)
    runs the stock preprocess either way.
    cache_mask: predict_record only. Per microbatch (one [B, S] bool tensor, or a list in
    forward order), True where a token may enter the predictor cache, in canonical order (token
    b * S + s): pass the loss mask, so padding and post-EOS tokens never train the predictor.
    cache_tokens_per_sequence then counts eligible tokens. None: every token is eligible.
    """
    if mode not in MODES:
        raise ValueError(f"routing mode={mode!r}: must be one of {MODES}")
    if not isinstance(ministep, int) or isinstance(ministep, bool) or ministep < 1:
        raise ValueError(f"routing ministep={ministep!r}: must be an integer >= 1")
    if dispatch_plan and mode != "replay":
        raise ValueError(f"routing dispatch_plan=True needs mode='replay', not {mode!r}")
    if isinstance(routes, RouteBatch):
        routes = [routes]
    if mode != "replay" and routes is not None:
        raise ValueError(f"routing mode={mode!r} takes no routes (only 'replay' does)")
    if cache_mask is not None:
        if mode != "predict_record":
            raise ValueError(f"routing cache_mask needs mode='predict_record', not {mode!r}")
        cache_mask = [cache_mask] if isinstance(cache_mask, torch.Tensor) else list(cache_mask)
        # Host copies made here, at entry: the per-microbatch record path reads no device mask.
        cache_mask = [mask.detach().to("cpu", torch.bool) for mask in cache_mask]
    routers = pr2_routers(model)
    routes = None if routes is None else list(routes)
    session = RoutingSession(
        mode, routers, routes, ministep, layout, cache_mask, stage=model_stage(model)
    )
    if mode == "replay":
        # Any error of any rank raises on every rank here, before the step's first collective.
        error = None
        try:
            _check_model(model, routers, mode)
        except (ValueError, RuntimeError) as exc:
            error = exc
        pp = model_group(model, "pp")
        facts = entry_facts(session, pp, num_microbatches, pending_routes, error)
        tp_dp_cp = routers[0].tp_dp_cp_group if routers else model_group(model, "tp_dp_cp")
        agree(facts, step_groups(tp_dp_cp, pp, group))
        if routers:
            # Every microbatch decoded once, here: the dispatch plan and the forwards share it,
            # and no forward decodes (no host work or sync on the per-microbatch path).
            session.decode_all()
    else:
        _check_model(model, routers, mode)
    plan = None
    if routers and mode == "replay" and dispatch_plan is not False:
        # Collective over tp_ep (after the support checks, so an unsupported model issues
        # none); installs nothing.
        try:
            plan = build_dispatch_plan(model, session, required=bool(dispatch_plan))
        except DispatchPlanUnsupported as exc:
            if dispatch_plan:
                raise
            _warn_unplanned(str(exc))
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
        # The handle keeps records and telemetry, not the replayed routes.
        session.release()


def _check_model(model: Model, routers: List[PR2Router], mode: str) -> None:
    """The model can be routed in `mode`: PR2 routers (in replay, a model without any MoE layer
    may join the agreement), distinct MoE-layer ids, no routing() context active on it."""
    if not routers and mode != "off" and (mode != "replay" or has_moe_layer(model)):
        raise ValueError("the model has no PR2 routers: build its layer spec with apply_pr2()")
    layer_ids = [r.moe_layer_id for r in routers]
    if len(set(layer_ids)) != len(layer_ids):
        raise ValueError(
            f"routers share MoE-layer ids {sorted(layer_ids)}: build MoE layers inside "
            "TransformerLayers (or call MoELayer.set_layer_number) so each has its own"
        )
    if any(r.session is not None for r in routers):
        raise RuntimeError("routing() contexts cannot nest on the same model")
