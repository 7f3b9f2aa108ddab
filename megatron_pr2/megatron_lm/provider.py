# Model providers whose MoE layers get PR2 routers: from a spec / spec function, or around an
# existing provider (Megatron-LM's pretrain_gpt.model_provider) with pr2_router_scope.

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_pr2.arguments import megatron_lm_args, pr2_config_from_args
from megatron_pr2.config import PR2Config
from megatron_pr2.spec import apply_pr2


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
        return pr2_config if pr2_config is not None else pr2_config_from_args(megatron_lm_args())

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
            args = megatron_lm_args()
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
