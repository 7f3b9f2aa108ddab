# apply_pr2 spec surgery: local, Transformer-Engine-shaped and DeepSeek-style block specs.

import dataclasses

import pytest
import torch
from harness import build_tiny_gpt, make_moe_config
from single_rank import single_rank


@pytest.fixture(scope="module")
def pg():
    with single_rank() as pg_collection:
        yield pg_collection


def _routers(spec):
    """Router builders of every MoE layer found in a spec tree."""
    from megatron_pr2.compat import moe_submodules_of

    found, stack, seen = [], [spec], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        submodules = moe_submodules_of(node)
        if submodules is not None:
            found.append(submodules.router)
        if hasattr(node, "submodules"):
            stack.append(node.submodules)
        if hasattr(node, "keywords"):
            stack.extend(node.keywords.values())
        if isinstance(node, (list, tuple)):
            stack.extend(node)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            stack.extend(getattr(node, f.name) for f in dataclasses.fields(node))
    return found


def test_local_layer_spec_gets_pr2_router_and_input_is_untouched(pg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_pr2 import PR2Config, PR2Router, apply_pr2

    spec = get_gpt_layer_local_spec(num_experts=8)
    config = PR2Config(alpha=50.0)
    out = apply_pr2(spec, config)
    (builder,) = _routers(out)
    assert builder.func is PR2Router and builder.keywords["pr2_config"] is config
    assert _routers(spec) == [TopKRouter]  # the caller's spec is not mutated


def test_transformer_engine_shaped_spec(pg):
    """TE specs need TE to build; the MoE spec structure comes from Megatron's backend helper."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    from megatron_pr2 import PR2Config, PR2Router, apply_pr2

    class _FakeTEBackend(LocalSpecProvider):
        # Stand-ins for TE classes: only the spec tree is inspected, nothing is built.
        def column_parallel_linear(self):
            return type("TEColumnParallelLinear", (torch.nn.Module,), {})

        def row_parallel_linear(self):
            return type("TERowParallelLinear", (torch.nn.Module,), {})

    spec = get_moe_module_spec_for_backend(_FakeTEBackend(), num_experts=8)
    (builder,) = _routers(apply_pr2(spec, PR2Config()))
    assert builder.func is PR2Router


def test_deepseek_style_block_dense_first_layers_and_shared_expert(pg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.mlp import MLP

    from megatron_pr2 import PR2Config, PR2Router, apply_pr2, pr2_routers

    config = make_moe_config(
        num_layers=4,
        moe_layer_freq=[0, 1, 0, 1],
        moe_shared_expert_intermediate_size=64,
    )
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    model = build_tiny_gpt(config, vocab_size=32, seq_len=8, spec=apply_pr2(block, PR2Config()))
    routers = pr2_routers(model)
    assert [r.moe_layer_id for r in routers] == [0, 1]
    assert [r.layer_number for r in routers] == [2, 4]
    layers = model.decoder.layers
    assert isinstance(layers[0].mlp, MLP) and isinstance(layers[2].mlp, MLP)
    assert all(layers[i].mlp.shared_experts is not None for i in (1, 3))
    assert all(isinstance(layers[i].mlp.router, PR2Router) for i in (1, 3))


def test_bad_inputs_raise(pg):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_pr2 import PR2Config, apply_pr2
    from megatron_pr2.compat import moe_submodules_of

    with pytest.raises(ValueError, match="no MoE layer"):
        apply_pr2(get_gpt_layer_local_spec(), PR2Config())
    with pytest.raises(ValueError, match="PR2Config"):
        apply_pr2(get_gpt_layer_local_spec(num_experts=8), {"alpha": 1})
    custom = get_gpt_layer_local_spec(num_experts=8)
    moe_submodules_of(custom.submodules.mlp).router = type("MyRouter", (), {})
    with pytest.raises(ValueError, match="TopKRouter"):
        apply_pr2(custom, PR2Config())
    for field, value in [
        ("alpha", 0.0),
        ("predictor", "mlp"),
        ("loss", "kl"),
        ("cache_tokens_per_sequence", -2),
        ("loss_start_ministep", 0),
        ("missing_route_policy", "ignore"),
        ("predictor_rank", 0),
    ]:
        with pytest.raises(ValueError, match=f"PR2Config.{field}="):
            PR2Config(**{field: value})
