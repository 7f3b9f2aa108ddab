# routing(model, mode, routes=None): the one switch between stock routing, recording and replay.
#
#   off             every PR2 router is Megatron's stock TopKRouter
#   record          R2: route with the live logits and record top-k (and capacity drops)
#   predict_record  PR2: route with live logits + predictor offset, record, cache (h_old, p_old)
#   replay          replay one RouteBatch per microbatch (forward order); train the predictor
#
# The context builds one RoutingSession (session.py) and hands it to every PR2 router of the
# model; all state lives on that session and drops on exit. The handle it yields gives the
# recorded routes and the replay telemetry.

import functools
import logging
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from megatron_pr2.dispatch_plan import DispatchPlanUnsupported, build_dispatch_plan
from megatron_pr2.model_index import Model, pr2_routers
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
    if mode == "replay":
        if not routes:
            raise ValueError("routing mode='replay' needs routes (a RouteBatch or a list of them)")
        for i, batch in enumerate(routes):
            if not isinstance(batch, RouteBatch):
                raise ValueError(f"routes[{i}] is {type(batch).__name__}, expected RouteBatch")
    elif routes is not None:
        raise ValueError(f"routing mode={mode!r} takes no routes (only 'replay' does)")
    if cache_mask is not None:
        if mode != "predict_record":
            raise ValueError(f"routing cache_mask needs mode='predict_record', not {mode!r}")
        cache_mask = [cache_mask] if isinstance(cache_mask, torch.Tensor) else list(cache_mask)
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
    session = RoutingSession(
        mode, routers, list(routes) if routes else None, ministep, layout, cache_mask
    )
    if mode == "replay":
        # Every microbatch decoded once, here: validation, the dispatch plan and the forwards
        # share it, and no forward decodes (no host work or sync on the per-microbatch path).
        session.decode_all()
    if mode == "replay" and group is not None:
        # Pipeline peers never meet in the stage agreement of _bind: agree before any forward.
        session.agree_on_entry(group)
    plan = None
    if mode == "replay" and dispatch_plan is not False:
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
