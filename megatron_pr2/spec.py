# apply_pr2(spec, config): swap the router of every MoE layer in a Megatron-Core spec for PR2's.
#
# Works on any spec tree Megatron-Core builds GPT models from: a single layer spec, a
# TransformerBlockSubmodules (e.g. DeepSeek-style layouts with dense first layers), local and
# Transformer-Engine specs, ModuleSpec (0.16) and functools.partial (0.17+) MoE-layer forms. PR2
# settings travel in the router builder (functools.partial(PR2Router, pr2_config=...)): the
# TransformerConfig stays Megatron's own class.

import copy
import dataclasses
import functools
from typing import Any

from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_pr2.compat import check_mcore_version, moe_submodules_of
from megatron_pr2.config import PR2Config
from megatron_pr2.router import PR2Router


def _swap(node: Any, builder: functools.partial, seen: set) -> int:
    """Replace routers below `node` in place; return how many MoE layers were found."""
    if id(node) in seen:
        return 0
    seen.add(id(node))
    found = 0
    submodules = moe_submodules_of(node)
    if submodules is not None:
        router = submodules.router
        current = router.func if isinstance(router, functools.partial) else router
        if current is not TopKRouter and current is not PR2Router:
            raise ValueError(
                f"apply_pr2: the MoE layer uses router {current!r}; PR2 replaces only "
                "Megatron-Core's TopKRouter"
            )
        submodules.router = builder
        found += 1
    if isinstance(node, ModuleSpec):
        found += _swap(node.submodules, builder, seen)
    elif isinstance(node, functools.partial):
        for value in node.keywords.values():
            found += _swap(value, builder, seen)
    elif isinstance(node, (list, tuple)):
        for item in node:
            found += _swap(item, builder, seen)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            found += _swap(getattr(node, f.name), builder, seen)
    return found


def apply_pr2(spec: Any, config: PR2Config) -> Any:
    """Return a copy of `spec` whose MoE layers build a PR2Router configured by `config`.

    Raises ValueError if `config` is not a PR2Config or the spec contains no MoE layer.
    """
    check_mcore_version()
    if not isinstance(config, PR2Config):
        raise ValueError(f"apply_pr2 config={config!r}: expected a megatron_pr2.PR2Config")
    spec = copy.deepcopy(spec)
    builder = functools.partial(PR2Router, pr2_config=config)
    if _swap(spec, builder, set()) == 0:
        raise ValueError(
            "apply_pr2: the spec contains no MoE layer (build it with num_experts set, e.g. "
            "get_gpt_layer_local_spec(num_experts=...))"
        )
    return spec
