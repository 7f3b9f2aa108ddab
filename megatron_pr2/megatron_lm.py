# Hook points of PR2 for RL frameworks built on Megatron-LM (megatron.training) or Megatron-Core.
#
#   pr2_model_provider(base, pr2_config)      model provider whose MoE layers get PR2 routers
#   routing_for_phase(model, phase, mode)     RL phase (rollout / old_logprob / train) x strategy
#                                             (none / r2 / r3 / pr2 / pr2-r3) -> routing() context
#   forward_backward_with_routes(...)         one Megatron schedule call with routes bound per
#                                             microbatch; pr2_step(...) does it for every call of
#                                             a wrapped forward_backward_func (train_step)
#   report_pr2_metrics(handle, iteration)     per-layer PR2 health metrics through Megatron's MoE
#                                             metrics tracker, reduced over ranks
#   install_megatron_lm_hooks()               runtime patch of megatron.training.training that
#                                             wires the above into pretrain()/train() (see
#                                             patches/README.md; patches/*.patch is the same
#                                             change as a source diff)
#
# Shapes: a route list holds one RouteBatch per microbatch in forward order; a RouteBatch's
# indices are [tokens, moe_layers, k]. Metric tensors in the tracker are [num_layers (+ MTP)],
# indexed by Megatron's 1-based transformer layer number, like its aux-loss entries.

import functools
import importlib
import importlib.util
import inspect
import math
import sys
import typing
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_pr2 import compat
from megatron_pr2.arguments import PR2_MODES, pr2_config_from_args, pr2_optimizer_config_overrides
from megatron_pr2.config import PR2Config
from megatron_pr2.context import METRIC_NAMES, RoutingHandle, pr2_routers, routing
from megatron_pr2.routes import RouteBatch, TokenLayout
from megatron_pr2.sharding import moe_layer_pattern
from megatron_pr2.spec import apply_pr2

Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]

# ---------------------------------------------------------------------------------------------
# RL phases x strategies
# ---------------------------------------------------------------------------------------------
PHASES = ("rollout", "old_logprob", "train")
"""rollout: generation with the policy (the inference pass); old_logprob: the trainer's pass that
computes log pi_old over the rollout batch; train: the policy-gradient mini-steps."""

PHASE_MODES: Dict[str, Dict[str, str]] = {
    "none": {"rollout": "off", "old_logprob": "off", "train": "off"},
    # R2: the trainer's old-policy pass records, training replays it.
    "r2": {"rollout": "off", "old_logprob": "record", "train": "replay"},
    # R3: the rollout records; the old-policy pass and training replay the rollout's routes.
    "r3": {"rollout": "record", "old_logprob": "replay", "train": "replay"},
    # PR2 on R2: the old-policy pass routes with live logits + predictor offset and caches
    # (h_old, p_old) for the predictor loss; training replays and trains the predictor.
    "pr2": {"rollout": "off", "old_logprob": "predict_record", "train": "replay"},
    # PR2 on R3: the rollout pass is the predictive record.
    "pr2-r3": {"rollout": "predict_record", "old_logprob": "replay", "train": "replay"},
}
assert tuple(PHASE_MODES) == PR2_MODES


def phase_routing_mode(phase: str, mode: str) -> str:
    """megatron_pr2.routing mode ("off", "record", "predict_record", "replay") of an RL phase.

    With an external inference engine (vLLM, SGLang) the rollout does not run this model: under
    r3 / pr2-r3 import the engine's routes with megatron_pr2.engines instead of recording here.
    """
    if mode not in PHASE_MODES:
        raise ValueError(f"--pr2-mode={mode}: must be one of {PR2_MODES}")
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: must be one of {PHASES}")
    return PHASE_MODES[mode][phase]


def _has_moe_layer(model: Model) -> bool:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return any(isinstance(m, MoELayer) for chunk in chunks for m in chunk.modules())


@contextmanager
def routing_for_phase(
    model: Model,
    phase: str,
    mode: str,
    routes: Optional[Union[RouteBatch, Sequence[RouteBatch]]] = None,
    ministep: int = 1,
    *,
    layout: Optional[TokenLayout] = None,
) -> Iterator[Optional[RoutingHandle]]:
    """Route the model's forward/backward passes inside the block as RL `phase` under `mode`.

    routes: one RouteBatch per microbatch (forward order) for phases that replay; None otherwise.
    ministep: 1-based training mini-step within the rollout batch (predictor loss from
    PR2Config.loss_start_ministep on).
    Yields the routing handle (recorded routes, replay metrics), or None on a rank whose model
    chunk(s) hold no MoE layer (a pipeline stage of dense layers): such a rank has nothing to
    route, ignores `routes` and still reports metrics (zeros) with report_pr2_metrics.
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
    if routing_mode != "off" and not pr2_routers(model):
        if _has_moe_layer(model):
            raise ValueError(
                f"--pr2-mode={mode}: the model has MoE layers but no PR2 routers; build it with "
                "megatron_pr2.megatron_lm.pr2_model_provider or megatron_pr2.apply_pr2"
            )
        yield None
        return
    with routing(model, routing_mode, routes, ministep=ministep, layout=layout) as handle:
        yield handle


# ---------------------------------------------------------------------------------------------
# Feeding routes to Megatron's forward_backward_func
# ---------------------------------------------------------------------------------------------
def forward_backward_with_routes(
    forward_backward_func: Callable,
    *,
    model: Model,
    phase: str,
    mode: str,
    routes: Optional[Sequence[RouteBatch]] = None,
    ministep: int = 1,
    layout: Optional[TokenLayout] = None,
    **schedule_kwargs: Any,
) -> Tuple[Any, Optional[RoutingHandle]]:
    """Run one Megatron schedule call (get_forward_backward_func()) as RL `phase` under `mode`.

    schedule_kwargs are the schedule's own keyword arguments (forward_step_func, data_iterator,
    num_microbatches, seq_length, micro_batch_size, forward_only, ...). Replaying phases need
    exactly num_microbatches routes, bound to the microbatches in forward order; every schedule
    (no pipelining, 1F1B, interleaved) and activation recompute replay the right one with no
    further action. Returns (the schedule's result, the routing handle or None).
    """
    num_microbatches = schedule_kwargs.get("num_microbatches")
    if routes is not None:
        routes = list(routes)
        if num_microbatches is not None and len(routes) != num_microbatches:
            raise ValueError(
                f"{len(routes)} routes for a forward_backward_func call of "
                f"num_microbatches={num_microbatches}: give one RouteBatch per microbatch"
            )
    with routing_for_phase(model, phase, mode, routes, ministep, layout=layout) as handle:
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
        routes = None
        if self._routes is not None:
            n = kwargs.get("num_microbatches", 1)
            routes = self._routes[self._next : self._next + n]
            if len(routes) != n:
                raise RuntimeError(
                    f"pr2_step({self.phase!r}): a forward_backward_func call needs {n} microbatch "
                    f"routes but only {len(routes)} of {len(self._routes)} are left"
                )
            self._next += n
        result, handle = forward_backward_with_routes(
            forward_backward_func,
            model=model,
            phase=self.phase,
            mode=self.mode,
            routes=routes,
            ministep=self.ministep,
            layout=self.layout,
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


_ACTIVE_STEP: Optional[PR2Step] = None
_LAST_TRAIN_HANDLE: Optional[RoutingHandle] = None


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
    global _ACTIVE_STEP, _LAST_TRAIN_HANDLE
    if _ACTIVE_STEP is not None:
        raise RuntimeError("pr2_step blocks cannot nest")
    if mode is None:
        mode = _megatron_args().pr2_mode
    step = PR2Step(phase, mode, routes, ministep, layout)
    _ACTIVE_STEP = step
    try:
        yield step
        step.close()
    finally:
        _ACTIVE_STEP = None
    if phase == "train" and step.handle is not None and step.handle.mode == "replay":
        _LAST_TRAIN_HANDLE = step.handle


class PR2ForwardBackward:
    """A Megatron forward_backward_func that routes its calls as the active pr2_step says.

    Outside a pr2_step block it calls the schedule unchanged (stock routing or the caller's own
    routing() context), so evaluation and non-RL training are unaffected.
    """

    def __init__(self, forward_backward_func: Callable) -> None:
        self.forward_backward_func = forward_backward_func
        functools.update_wrapper(self, forward_backward_func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _ACTIVE_STEP is None:
            return self.forward_backward_func(*args, **kwargs)
        return _ACTIVE_STEP.run(self.forward_backward_func, args, kwargs)


def wrap_forward_backward_func(forward_backward_func: Callable) -> Callable:
    """Wrap the result of get_forward_backward_func() so pr2_step blocks route its calls."""
    if isinstance(forward_backward_func, PR2ForwardBackward):
        return forward_backward_func
    return PR2ForwardBackward(forward_backward_func)


def last_train_handle() -> Optional[RoutingHandle]:
    """Routing handle of the latest replaying pr2_step("train") block, or None."""
    return _LAST_TRAIN_HANDLE


# ---------------------------------------------------------------------------------------------
# Metrics through Megatron's MoE metrics tracker
# ---------------------------------------------------------------------------------------------
def tracker_name(metric: str) -> str:
    """Tracker entry of a PR2 metric: per-layer sum over ranks of the rank-local means."""
    return f"pr2/{metric}"


def _measured_name(metric: str) -> str:
    # Per layer, how many ranks measured the metric (its companion entry; see save_pr2_metrics).
    return f"pr2/{metric}/ranks"


def pr2_track_names() -> List[str]:
    """Every tracker entry save_pr2_metrics creates (the same list on every rank)."""
    return [n for m in METRIC_NAMES for n in (tracker_name(m), _measured_name(m))]


def moe_layer_numbers(
    num_layers: int,
    moe_layer_freq: Union[int, Sequence[int]] = 1,
    mtp_num_layers: Optional[int] = None,
) -> List[int]:
    """1-based transformer layer numbers of the MoE layers, indexed by global MoE-layer id.

    Multi-token-prediction layers follow the decoder (layer number num_layers + j, MoE-layer id
    after the decoder's), as Megatron numbers them and megatron_pr2.sharding counts them.
    """
    mtp = [num_layers + j for j in range(1, (mtp_num_layers or 0) + 1)]
    config = SimpleNamespace(num_layers=num_layers, moe_layer_freq=moe_layer_freq)
    return [i + 1 for i, is_moe in enumerate(moe_layer_pattern(config)) if is_moe] + mtp


def _metrics_device() -> torch.device:
    # Tracker tensors take part in collectives: on the accelerator under NCCL.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def save_pr2_metrics(
    handle: Optional[RoutingHandle],
    *,
    num_layers: int,
    moe_layer_freq: Union[int, Sequence[int]] = 1,
    mtp_num_layers: Optional[int] = None,
    pg_collection: Any = None,
) -> List[str]:
    """Save the replay metrics of `handle` into Megatron's MoE metrics tracker; call on EVERY rank.

    For each metric m two entries of size num_layers (+ mtp_num_layers) are written at the MoE
    layers' transformer layer numbers: "pr2/m" (this rank's mean) and "pr2/m/ranks" (1 where this
    rank measured m). Both reduce by sum over the pipeline group (Megatron's tracker does that for
    every entry) and over the tensor x data x context parallel group (reduce_group; sums only,
    which gloo also supports), so after the reduction "pr2/m" / "pr2/m/ranks" is the mean over
    the ranks that measured m. Ranks without a handle (a pipeline stage without MoE layers, a
    non-replay phase) create the same entries with zeros, so every rank joins every reduction.
    Returns the entry names (pr2_track_names()).
    """
    if pg_collection is not None:
        reduce_group = pg_collection.tp_dp_cp
    else:
        reduce_group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    size = num_layers + (mtp_num_layers or 0)
    device = _metrics_device()
    layer_numbers = moe_layer_numbers(num_layers, moe_layer_freq, mtp_num_layers)
    metrics: Dict[str, torch.Tensor] = {}
    layer_ids: List[int] = []
    if handle is not None and handle.mode == "replay":
        metrics, layer_ids = handle.metrics, handle.layer_ids

    def save(name: str, value: float, layer_number: int) -> None:
        compat.save_to_aux_losses_tracker(
            name,
            torch.tensor(value, dtype=torch.float32, device=device),
            layer_number,
            size,
            reduce_group=reduce_group,
            reduce_group_has_dp=True,
        )

    for metric in METRIC_NAMES:
        # A zero added at layer 1 creates the entry with the same size and groups on every rank.
        save(tracker_name(metric), 0.0, 1)
        save(_measured_name(metric), 0.0, 1)
        values = metrics.get(metric)
        if values is None:
            continue
        for moe_layer_id, value in zip(layer_ids, values.tolist()):
            if math.isnan(value):
                continue
            save(tracker_name(metric), value, layer_numbers[moe_layer_id])
            save(_measured_name(metric), 1.0, layer_numbers[moe_layer_id])
    return pr2_track_names()


def report_pr2_metrics(
    handle: Optional[RoutingHandle],
    iteration: int,
    writer: Any = None,
    wandb_writer: Any = None,
    *,
    num_layers: int,
    moe_layer_freq: Union[int, Sequence[int]] = 1,
    mtp_num_layers: Optional[int] = None,
    per_layer_logging: bool = False,
    total_loss_dict: Optional[dict] = None,
    pg_collection: Any = None,
) -> Dict[str, float]:
    """Reduce the PR2 metrics of this step over all ranks and log them; call on EVERY rank.

    handle: the replay handle of this rank (routing()/routing_for_phase/pr2_step), or None on
    ranks without MoE layers or without a replay this step.
    Saves through save_pr2_metrics, reduces with Megatron's tracker reduction (the one
    track_moe_metrics runs), writes "pr2/<metric>" (mean over the MoE layers that measured it)
    and, with per_layer_logging, "moe/pr2/<metric>_layer_<i>" (i: 0-based transformer layer, as
    Megatron's per-layer MoE logging) to the TensorBoard `writer` / `wandb_writer` where given
    (Megatron-LM: the last rank); adds "pr2/predictor_loss" to total_loss_dict when given. The
    PR2 entries are then removed from the tracker, so Megatron's own report of its aux losses
    neither sees nor clears them, and other tracker entries are left untouched.
    Returns {tag: value} of every scalar logged or loggable (identical on all ranks).
    """
    names = save_pr2_metrics(
        handle,
        num_layers=num_layers,
        moe_layer_freq=moe_layer_freq,
        mtp_num_layers=mtp_num_layers,
        pg_collection=pg_collection,
    )
    try:
        compat.reduce_aux_losses_tracker_across_ranks(names, pg_collection=pg_collection)
        entries = compat.get_moe_layer_wise_logging_tracker()
        scalars: Dict[str, float] = {}
        per_layer: Dict[str, float] = {}
        for metric in METRIC_NAMES:
            sums = entries[tracker_name(metric)]["values"].detach().double().cpu()
            ranks = entries[_measured_name(metric)]["values"].detach().double().cpu()
            measured = torch.nonzero(ranks > 0).squeeze(1)
            if measured.numel() == 0:
                continue
            layer_means = sums[measured] / ranks[measured]
            tag = tracker_name(metric)
            scalars[tag] = float(layer_means.mean())
            for layer, value in zip(measured.tolist(), layer_means.tolist()):
                per_layer[f"moe/{tag}_layer_{layer}"] = value
    finally:
        compat.discard_moe_metrics(names)

    logged = dict(scalars)
    if per_layer_logging:
        logged.update(per_layer)
    for tag, value in logged.items():
        if writer is not None:
            writer.add_scalar(tag, value, iteration)
        if wandb_writer is not None:
            wandb_writer.log({tag: value}, iteration)
    loss_tag = tracker_name("predictor_loss")
    if total_loss_dict is not None and loss_tag in scalars:
        value = torch.tensor([scalars[loss_tag]], dtype=torch.float32, device=_metrics_device())
        total_loss_dict[loss_tag] = total_loss_dict.get(loss_tag, 0.0) + value
    return {**scalars, **per_layer}


# ---------------------------------------------------------------------------------------------
# Model provider
# ---------------------------------------------------------------------------------------------
def _swap_submodules(submodules: Any, pr2_config: PR2Config) -> Any:
    # Through apply_pr2, so the MoE layer gets exactly the router the spec path would give it.
    return apply_pr2(ModuleSpec(module=MoELayer, submodules=submodules), pr2_config).submodules


@contextmanager
def pr2_router_scope(pr2_config: PR2Config) -> Iterator[None]:
    """Inside the block, every MoELayer built from a spec with Megatron's TopKRouter gets a PR2Router.

    For model providers that build their layer spec internally (Megatron-LM's pretrain_gpt.py):
    MoELayer.__init__ is wrapped for the duration of the block only, and the MoE submodules it
    receives go through apply_pr2 (on a copy; the caller's spec is not modified). Construction
    order and RNG use are those of the stock model (the predictor starts at zero), so the PR2
    model has the stock model's weights for the same seed.
    """
    if not isinstance(pr2_config, PR2Config):
        raise ValueError(f"pr2_config={pr2_config!r}: expected a megatron_pr2.PR2Config")
    original = MoELayer.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        if kwargs.get("submodules") is not None:
            kwargs["submodules"] = _swap_submodules(kwargs["submodules"], pr2_config)
        elif len(args) >= 2 and args[1] is not None:
            args = (args[0], _swap_submodules(args[1], pr2_config), *args[2:])
        original(self, *args, **kwargs)

    MoELayer.__init__ = init
    try:
        yield
    finally:
        MoELayer.__init__ = original


def _is_spec(obj: Any) -> bool:
    # A spec: ModuleSpec, a spec dataclass, or functools.partial of a module class (0.17+ MoE
    # form). A partial of a function is a provider (Megatron-LM: partial(model_provider, builder)).
    if isinstance(obj, functools.partial):
        return isinstance(obj.func, type)
    return not callable(obj) or isinstance(obj, ModuleSpec)


def _call_spec_fn(spec_fn: Callable, config: Any, vp_stage: Optional[int]) -> Any:
    params = inspect.signature(spec_fn).parameters
    kwargs = {}
    if "config" in params:
        kwargs["config"] = config
    if "vp_stage" in params:
        kwargs["vp_stage"] = vp_stage
    if not kwargs and params:
        return spec_fn(config)
    return spec_fn(**kwargs)


def pr2_model_provider(
    base_provider_or_spec_fn: Any,
    pr2_config: Optional[PR2Config] = None,
    **gpt_model_kwargs: Any,
) -> Callable:
    """A Megatron model provider whose MoE layers use PR2 routers.

    base_provider_or_spec_fn is one of
      * a model provider (a callable with a `pre_process` parameter, e.g. Megatron-LM's
        pretrain_gpt.model_provider): it is called unchanged inside pr2_router_scope;
      * a layer/block spec (ModuleSpec, TransformerBlockSubmodules, functools.partial) or a
        spec function (taking `config` and/or `vp_stage`, e.g. lambda config:
        get_gpt_decoder_block_spec(config, use_transformer_engine=True)): the spec goes through
        apply_pr2 and a GPTModel is built from it. GPTModel's vocab_size / max_sequence_length
        come from gpt_model_kwargs or Megatron-LM's args (padded_vocab_size,
        max_position_embeddings); the TransformerConfig from the provider's `config` argument or
        core_transformer_config_from_args.
    pr2_config: None reads it from Megatron-LM's --pr2-* args when the provider runs.
    The returned provider takes Megatron's provider arguments (pre_process, post_process,
    vp_stage, config, pg_collection).
    """

    def config_now() -> PR2Config:
        return pr2_config if pr2_config is not None else pr2_config_from_args(_megatron_args())

    if not _is_spec(base_provider_or_spec_fn) and (
        "pre_process" in inspect.signature(base_provider_or_spec_fn).parameters
    ):
        base_provider = base_provider_or_spec_fn

        @functools.wraps(base_provider)
        def provider(*args: Any, **kwargs: Any) -> Any:
            with pr2_router_scope(config_now()):
                return base_provider(*args, **kwargs)

        return provider

    spec_or_fn = base_provider_or_spec_fn

    def provider(
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        config: Any = None,
        pg_collection: Any = None,
    ) -> torch.nn.Module:
        from megatron.core.models.gpt.gpt_model import GPTModel

        kwargs = dict(gpt_model_kwargs)
        if config is None:
            config = kwargs.pop("config", None)
        if config is None or "vocab_size" not in kwargs or "max_sequence_length" not in kwargs:
            args = _megatron_args()
            if config is None:
                from megatron.training.arguments import core_transformer_config_from_args

                config = core_transformer_config_from_args(args)
            kwargs.setdefault("vocab_size", args.padded_vocab_size)
            kwargs.setdefault("max_sequence_length", args.max_position_embeddings)
        spec = spec_or_fn if _is_spec(spec_or_fn) else _call_spec_fn(spec_or_fn, config, vp_stage)
        spec = apply_pr2(spec, config_now())
        if vp_stage is not None:
            kwargs["vp_stage"] = vp_stage
        if pg_collection is not None:
            kwargs["pg_collection"] = pg_collection
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            pre_process=pre_process,
            post_process=post_process,
            **kwargs,
        )

    return provider


# ---------------------------------------------------------------------------------------------
# Megatron-LM (megatron.training) integration
# ---------------------------------------------------------------------------------------------
def import_megatron_training() -> Any:
    """Import megatron.training (Megatron-LM's training loop) and return the package.

    megatron-core 0.19's wheel ships megatron.training; 0.16.1's does not (use a Megatron-LM
    checkout on PYTHONPATH). megatron.training 0.19 needs Python >= 3.12 for typing.override
    alone; on 3.11 that one name is backported from typing_extensions (nothing else changes).
    On a machine without CUDA call megatron_pr2.cpu.apply_cpu_patches() first.
    """
    if importlib.util.find_spec("megatron.training") is None:
        raise ImportError(
            "megatron.training (Megatron-LM) is not importable: the megatron-core 0.16 wheel does "
            "not ship it; put a Megatron-LM checkout on PYTHONPATH"
        )
    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    return importlib.import_module("megatron.training")


def _megatron_args() -> Any:
    from megatron.training import get_args

    return get_args()


def pr2_optimizer_overrides_from_args(optimizer_config: Any, config_overrides: Optional[dict]):
    """config_overrides with the predictor at --pr2-alpha x lr (Megatron-LM's global args)."""
    alpha = pr2_config_from_args(_megatron_args()).alpha
    return pr2_optimizer_config_overrides(optimizer_config, alpha, config_overrides)


def log_pr2_metrics(iteration: int, total_loss_dict: Optional[dict] = None) -> Dict[str, float]:
    """report_pr2_metrics for Megatron-LM's training_log: every rank, every iteration.

    Uses the handle of the latest pr2_step("train") block (None where there was none) and
    Megatron-LM's args and writers. Does nothing under --pr2-mode none (the same on all ranks).
    """
    global _LAST_TRAIN_HANDLE
    from megatron.training import get_tensorboard_writer, get_wandb_writer

    args = _megatron_args()
    if getattr(args, "pr2_mode", "none") == "none":
        return {}
    handle, _LAST_TRAIN_HANDLE = _LAST_TRAIN_HANDLE, None
    return report_pr2_metrics(
        handle,
        iteration,
        get_tensorboard_writer(),
        get_wandb_writer(),
        num_layers=args.num_layers,
        moe_layer_freq=args.moe_layer_freq,
        mtp_num_layers=args.mtp_num_layers,
        per_layer_logging=args.moe_per_layer_logging,
        total_loss_dict=total_loss_dict,
    )


_HOOKED_NAMES = ("get_forward_backward_func", "get_megatron_optimizer", "training_log")
_ORIGINALS: Dict[str, Callable] = {}


def install_megatron_lm_hooks() -> None:
    """Runtime patch of megatron.training.training (Megatron-LM) for PR2; idempotent.

    Module attributes of megatron.training.training are wrapped (nothing else changes):
      * get_forward_backward_func: its result is wrapped by wrap_forward_backward_func, so
        train()/evaluate() calls route as the active pr2_step block says (unchanged outside);
      * get_megatron_optimizer: config_overrides gain the predictor's alpha x lr group
        (--pr2-alpha), on top of the overrides Megatron-LM passes;
      * training_log: log_pr2_metrics(iteration) runs first, on every rank.
    Install before calling pretrain(); use pr2_model_provider and extra_args_provider=add_pr2_args.
    patches/README.md documents it; patches/megatron-lm-0.19.2-training-pr2.patch is the same
    change as a source diff.
    """
    training = importlib.import_module("megatron.training.training")
    missing = [name for name in _HOOKED_NAMES if not hasattr(training, name)]
    if missing:
        raise RuntimeError(f"megatron.training.training has no {missing}: unsupported Megatron-LM")
    if _ORIGINALS:
        return
    originals = {name: getattr(training, name) for name in _HOOKED_NAMES}

    get_fbf = originals["get_forward_backward_func"]

    @functools.wraps(get_fbf)
    def get_forward_backward_func(*args: Any, **kwargs: Any) -> Callable:
        return wrap_forward_backward_func(get_fbf(*args, **kwargs))

    get_optimizer = originals["get_megatron_optimizer"]
    optimizer_signature = inspect.signature(get_optimizer)
    if "config_overrides" not in optimizer_signature.parameters:
        raise RuntimeError(
            "get_megatron_optimizer takes no config_overrides: megatron-core >= 0.16 required"
        )

    @functools.wraps(get_optimizer)
    def get_megatron_optimizer(*args: Any, **kwargs: Any) -> Any:
        bound = optimizer_signature.bind(*args, **kwargs)
        bound.arguments["config_overrides"] = pr2_optimizer_overrides_from_args(
            bound.arguments["config"], bound.arguments.get("config_overrides")
        )
        return get_optimizer(*bound.args, **bound.kwargs)

    log = originals["training_log"]
    log_signature = inspect.signature(log)

    @functools.wraps(log)
    def training_log(*args: Any, **kwargs: Any) -> Any:
        bound = log_signature.bind(*args, **kwargs)
        log_pr2_metrics(bound.arguments["iteration"])
        return log(*args, **kwargs)

    training.get_forward_backward_func = get_forward_backward_func
    training.get_megatron_optimizer = get_megatron_optimizer
    training.training_log = training_log
    _ORIGINALS.update(originals)


def remove_megatron_lm_hooks() -> None:
    """Undo install_megatron_lm_hooks (tests, or switching PR2 off in one process)."""
    if not _ORIGINALS:
        return
    training = importlib.import_module("megatron.training.training")
    for name, original in _ORIGINALS.items():
        setattr(training, name, original)
    _ORIGINALS.clear()
