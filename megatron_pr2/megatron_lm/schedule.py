# Routes through Megatron's forward_backward_func: one schedule call (or every call inside a
# pr2_step block) routed as an RL phase under a strategy (phases.py).
#
#   routing_for_phase(model, phase, mode)     RL phase x strategy -> routing() context
#   forward_backward_with_routes(...)         one Megatron schedule call with routes bound per
#                                             microbatch
#   pr2_step(phase, ...)                      the same for every call of a wrapped
#                                             forward_backward_func (Megatron-LM's train_step)
#
# Shapes: a route list holds one RouteBatch per microbatch in forward order.
#
# State: Megatron-LM's train() obtains forward_backward_func itself, so the step a wrapped call
# belongs to is the active pr2_step block; it lives on one _StepState object, set only inside
# the block (and the last training handle until log_pr2_metrics takes it).

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from megatron_pr2.arguments import megatron_lm_args
from megatron_pr2.model_index import Model, has_moe_layer, pr2_routers
from megatron_pr2.phases import phase_routing_mode
from megatron_pr2.routes import RouteBatch, TokenLayout
from megatron_pr2.routing_context import RoutingHandle, routing


@contextmanager
def routing_for_phase(
    model: Model,
    phase: str,
    mode: str,
    routes: Optional[Union[RouteBatch, Sequence[RouteBatch]]] = None,
    ministep: int = 1,
    *,
    layout: Optional[TokenLayout] = None,
    num_microbatches: Optional[int] = None,
    pending_routes: Optional[int] = None,
) -> Iterator[Optional[RoutingHandle]]:
    """Route the model's forward/backward passes inside the block as RL `phase` under `mode`.

    routes: one RouteBatch per microbatch (forward order) for phases that replay; None otherwise.
    ministep: 1-based training mini-step within the rollout batch (predictor loss from
    PR2Config.loss_start_ministep on).
    num_microbatches / pending_routes: checked in the replay entry agreement (routing()).
    Yields the routing handle (recorded routes, replay metrics), or None on a rank whose model
    chunk(s) hold no MoE layer (a pipeline stage of dense layers): such a rank has nothing to
    route; in replay it still joins routing()'s entry agreement (so an error on another stage
    raises here too, instead of leaving this stage waiting in a pipeline receive), and it still
    reports metrics (zeros) with report_pr2_metrics.
    """
    routing_mode = phase_routing_mode(phase, mode)
    if routing_mode == "replay" and routes is None:
        raise ValueError(
            f"phase={phase!r} under --pr2-mode={mode} replays recorded routes: pass routes= "
            "(one RouteBatch per microbatch)"
        )
    if routing_mode != "replay" and routes is not None:
        raise ValueError(
            f"phase={phase!r} under --pr2-mode={mode} routes in {routing_mode!r} mode, which "
            "takes no routes"
        )
    dense = routing_mode != "off" and not pr2_routers(model)
    if dense and has_moe_layer(model):
        raise ValueError(
            f"--pr2-mode={mode}: the model has MoE layers but no PR2 routers; build it with "
            "megatron_pr2.megatron_lm.pr2_model_provider or megatron_pr2.apply_pr2"
        )
    if dense and routing_mode != "replay":
        yield None
        return
    with routing(
        model,
        routing_mode,
        routes,
        ministep=ministep,
        layout=layout,
        num_microbatches=num_microbatches,
        pending_routes=pending_routes,
    ) as handle:
        yield None if dense else handle


def forward_backward_with_routes(
    forward_backward_func: Callable,
    *,
    model: Model,
    phase: str,
    mode: str,
    routes: Optional[Sequence[RouteBatch]] = None,
    ministep: int = 1,
    layout: Optional[TokenLayout] = None,
    pending_routes: Optional[int] = None,
    **schedule_kwargs: Any,
) -> Tuple[Any, Optional[RoutingHandle]]:
    """Run one Megatron schedule call (get_forward_backward_func()) as RL `phase` under `mode`.

    schedule_kwargs are the schedule's own keyword arguments (forward_step_func, data_iterator,
    num_microbatches, seq_length, micro_batch_size, forward_only, ...). Replaying phases need
    exactly num_microbatches routes, bound to the microbatches in forward order (checked in
    routing()'s entry agreement, on every rank); every schedule (no pipelining, 1F1B,
    interleaved) and activation recompute replay the right one with no further action.
    Returns (the schedule's result, the routing handle or None).
    """
    with routing_for_phase(
        model,
        phase,
        mode,
        None if routes is None else list(routes),
        ministep,
        layout=layout,
        num_microbatches=schedule_kwargs.get("num_microbatches"),
        pending_routes=pending_routes,
    ) as handle:
        result = forward_backward_func(model=model, **schedule_kwargs)
    return result, handle


def split_routes(routes: Sequence[RouteBatch], num_microbatches: int) -> List[List[RouteBatch]]:
    """Cut a rollout batch's per-microbatch routes into consecutive steps of num_microbatches."""
    if num_microbatches < 1 or len(routes) % num_microbatches:
        raise ValueError(
            f"{len(routes)} microbatch routes cannot be split into steps of "
            f"num_microbatches={num_microbatches}"
        )
    return [list(routes[i : i + num_microbatches]) for i in range(0, len(routes), num_microbatches)]


class PR2Step:
    """Routing of every forward_backward_func call made inside one `pr2_step` block."""

    def __init__(
        self,
        phase: str,
        mode: str,
        routes: Optional[Sequence[RouteBatch]],
        ministep: int,
        layout: Optional[TokenLayout],
    ) -> None:
        self.phase, self.mode, self.ministep, self.layout = phase, mode, ministep, layout
        phase_routing_mode(phase, mode)  # validates both
        self._routes = None if routes is None else list(routes)
        self._next = 0
        self.handles: List[Optional[RoutingHandle]] = []
        """One entry per forward_backward_func call (None on ranks without MoE layers)."""

    @property
    def recorded_routes(self) -> List[RouteBatch]:
        """Routes recorded by the block's calls, one per microbatch in forward order."""
        out: List[RouteBatch] = []
        for handle in self.handles:
            if handle is not None:
                out.extend(handle.routes_per_microbatch)
        return out

    @property
    def handle(self) -> Optional[RoutingHandle]:
        """The handle of the block's last call (None before any call or without MoE layers)."""
        return self.handles[-1] if self.handles else None

    def run(self, forward_backward_func: Callable, args: tuple, kwargs: dict) -> Any:
        if args:
            raise TypeError("Megatron schedules take keyword arguments only")
        kwargs = dict(kwargs)
        model = kwargs.pop("model")
        routes = pending = None
        if self._routes is not None:
            # Too few routes left raise in routing()'s entry agreement (count against
            # num_microbatches), on every rank; the routes kept for later calls are agreed too.
            n = kwargs.get("num_microbatches", 1)
            routes = self._routes[self._next : self._next + n]
            self._next += len(routes)
            pending = len(self._routes) - self._next
        result, handle = forward_backward_with_routes(
            forward_backward_func,
            model=model,
            phase=self.phase,
            mode=self.mode,
            routes=routes,
            ministep=self.ministep,
            layout=self.layout,
            pending_routes=pending,
            **kwargs,
        )
        self.handles.append(handle)
        return result

    def close(self) -> None:
        if self._routes is not None and self._next != len(self._routes):
            raise RuntimeError(
                f"pr2_step({self.phase!r}): {len(self._routes) - self._next} of "
                f"{len(self._routes)} microbatch routes were never consumed"
            )


class _StepState:
    """The active pr2_step block and the handle of the latest replaying training block."""

    active: Optional[PR2Step] = None
    last_train_handle: Optional[RoutingHandle] = None


_STATE = _StepState()


@contextmanager
def pr2_step(
    phase: str,
    mode: Optional[str] = None,
    routes: Optional[Sequence[RouteBatch]] = None,
    ministep: int = 1,
    *,
    layout: Optional[TokenLayout] = None,
) -> Iterator[PR2Step]:
    """Route every wrapped forward_backward_func call inside the block as RL `phase`.

    For Megatron-LM loops that call train_step (which calls forward_backward_func itself): after
    install_megatron_lm_hooks() (or wrap_forward_backward_func), e.g.

        with pr2_step("old_logprob") as step:      # --pr2-mode pr2: predictive record
            compute_old_logprobs(...)              # any number of forward_only calls
        for i, step_routes in enumerate(split_routes(step.recorded_routes, num_microbatches)):
            with pr2_step("train", routes=step_routes, ministep=i + 1):
                train_step(...)

    mode defaults to Megatron-LM's --pr2-mode. Replay routes are consumed num_microbatches per
    call, in order; routes left unconsumed at the end of the block raise RuntimeError.
    """
    if _STATE.active is not None:
        raise RuntimeError("pr2_step blocks cannot nest")
    if mode is None:
        mode = megatron_lm_args().pr2_mode
    step = PR2Step(phase, mode, routes, ministep, layout)
    _STATE.active = step
    try:
        yield step
        step.close()
    finally:
        _STATE.active = None
    if phase == "train" and step.handle is not None and step.handle.mode == "replay":
        _STATE.last_train_handle = step.handle


class PR2ForwardBackward:
    """A Megatron forward_backward_func that routes its calls as the active pr2_step says.

    Outside a pr2_step block it calls the schedule unchanged (stock routing or the caller's own
    routing() context), so evaluation and non-RL training are unaffected.
    """

    def __init__(self, forward_backward_func: Callable) -> None:
        self.forward_backward_func = forward_backward_func
        functools.update_wrapper(self, forward_backward_func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _STATE.active is None:
            return self.forward_backward_func(*args, **kwargs)
        return _STATE.active.run(self.forward_backward_func, args, kwargs)


def wrap_forward_backward_func(forward_backward_func: Callable) -> Callable:
    """Wrap the result of get_forward_backward_func() so pr2_step blocks route its calls."""
    if isinstance(forward_backward_func, PR2ForwardBackward):
        return forward_backward_func
    return PR2ForwardBackward(forward_backward_func)


def last_train_handle() -> Optional[RoutingHandle]:
    """Routing handle of the latest replaying pr2_step("train") block, or None."""
    return _STATE.last_train_handle


def take_last_train_handle() -> Optional[RoutingHandle]:
    """last_train_handle(), cleared: each training block's metrics are logged once."""
    handle, _STATE.last_train_handle = _STATE.last_train_handle, None
    return handle


# ---------------------------------------------------------------------------------------------
