# The DeepSeek-V3 recipe at tiny size, one process on CPU: a GPTModel with multi-latent
# attention (MLA) whose first layer is dense, whose MoE layers route sigmoid scores with an
# expert bias (aux-loss-free balancing), group-limited top-k (4 groups, top-2 groups), a top-k
# scaling factor, a sequence aux loss and shared experts, with one multi-token-prediction (MTP)
# layer that is an MoE layer too, and moe_router_fusion=True (PR2 modes route through
# Megatron's unfused top-k).
#
# Checked: record, predict_record (with a non-zero predictor) and replay run through every
# router including the MTP layer's; after the router weights drift, replay routes every
# (token, layer) to exactly the recorded experts (and the drifted live router would not); the
# fused-config model replays bit-identically (outputs and every gradient) to the same model with
# moe_router_fusion=False; every recorded and replayed token uses experts of at most
# moe_router_group_topk groups.

import pytest
import torch
import torch.nn.functional as F
from single_rank import single_rank

EXPERTS, TOPK, GROUPS, GROUP_TOPK = 16, 4, 4, 2
SEQ, BATCH, VOCAB = 16, 2, 64


@pytest.fixture(scope="module")
def pg():
    with single_rank() as pg_collection:
        yield pg_collection


def _config(fusion: bool):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_pr2.cpu import PLAIN_CONFIG_FIELDS

    return MLATransformerConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        # Multi-latent attention (megatron_pr2.cpu builds it without Transformer Engine).
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        rope_type="rope",
        rotary_base=10000,
        rotary_scaling_factor=1.0,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_layer_freq=[0, 1],
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=GROUPS,
        moe_router_group_topk=GROUP_TOPK,
        moe_router_topk_scaling_factor=2.5,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-3,
        moe_router_fusion=fusion,
        moe_token_dispatcher_type="alltoall",
        mtp_num_layers=1,
        normalization="RMSNorm",
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        params_dtype=torch.float32,
        **PLAIN_CONFIG_FIELDS,
    )


def _model(config):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_pr2 import PR2Config, apply_pr2

    block = apply_pr2(
        get_gpt_decoder_block_spec(config, use_transformer_engine=False),
        PR2Config(cache_tokens_per_sequence=4, loss_start_ministep=1),
    )
    mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False)
    torch.manual_seed(0)
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        mtp_block_spec=mtp,
        share_embeddings_and_output_weights=False,
    )


@pytest.fixture()
def no_mtp_tracker(monkeypatch):
    # MTPLossLoggingHelper allocates its tracker with torch.cuda.current_device(): logging only
    # (save_loss_to_tracker on megatron-core 0.16, save_metrics_to_tracker on 0.19).
    from megatron.core.transformer import multi_token_prediction

    helper = multi_token_prediction.MTPLossLoggingHelper
    for name in ("save_loss_to_tracker", "save_metrics_to_tracker"):
        if hasattr(helper, name):
            monkeypatch.setattr(helper, name, staticmethod(lambda *args, **kwargs: None))


def _inputs():
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return tokens, torch.arange(SEQ).expand(BATCH, SEQ), labels


def _capture(model):
    """Forward hooks on every PR2 router: routing_map [T, E] per call, by MoE-layer id."""
    from megatron_pr2.model_index import pr2_routers

    maps = {}
    for router in pr2_routers(model):
        router.register_forward_hook(
            lambda m, i, o: maps.setdefault(m.moe_layer_id, []).append(o[1].detach().clone())
        )
    return maps


def _groups_used(routing_map: torch.Tensor) -> torch.Tensor:
    """[T] number of expert groups each token's experts fall in."""
    per_group = routing_map.view(routing_map.shape[0], GROUPS, EXPERTS // GROUPS)
    return per_group.any(dim=-1).sum(dim=-1)


def _step(model, routes, ministep=2):
    from megatron_pr2 import routing

    tokens, position_ids, labels = _inputs()
    with routing(model, "replay", routes, ministep=ministep) as handle:
        loss = model(tokens, position_ids, None, labels=labels)
        loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, handle


def _drift(model):
    from megatron_pr2.model_index import pr2_routers

    gen = torch.Generator().manual_seed(9)
    for router in pr2_routers(model):
        with torch.no_grad():
            router.weight.add_(torch.randn(router.weight.shape, generator=gen) * 0.5)


def test_dsv3_recipe_replays_exactly_within_group_limits(pg, no_mtp_tracker):
    from megatron_pr2 import routing
    from megatron_pr2.model_index import pr2_routers

    fused, unfused = _model(_config(True)), _model(_config(False))
    routers = pr2_routers(fused)
    # The decoder's MoE layer and the MTP layer's, each with shared experts.
    assert [r.moe_layer_id for r in routers] == [0, 1]
    assert all(r.config.moe_router_fusion for r in routers)
    assert type(fused.decoder.layers[0].self_attention).__name__ == "MLASelfAttention"
    for router in routers:
        with torch.no_grad():  # a predictor that moves routes: predict_record differs from R2
            router.predictor.weight.normal_(0, 0.5)
    unfused.load_state_dict(fused.state_dict())
    maps = _capture(fused)
    tokens, position_ids, labels = _inputs()
    with torch.no_grad(), routing(fused, "predict_record") as handle:
        fused(tokens, position_ids, None, labels=labels)
    routes = handle.routes
    assert routes.cache is not None and routes.shape[1] == 2
    recorded = {layer: calls[0] for layer, calls in maps.items()}
    _drift(fused)
    _drift(unfused)
    # The drifted live router routes differently, so the check below can fail ('record' routes
    # live; outside a context the fused router needs TE's kernel, absent on CPU).
    with torch.no_grad(), routing(fused, "record"):
        fused(tokens, position_ids, None, labels=labels)
    assert any(not torch.equal(recorded[i], maps[i][1]) for i in recorded)
    loss, grads, replay = _step(fused, routes)
    for layer, calls in maps.items():
        assert torch.equal(calls[2], recorded[layer]), layer  # every (token, layer) replayed
        for routing_map in (recorded[layer], calls[2]):
            assert int(_groups_used(routing_map).max()) <= GROUP_TOPK
            assert bool((routing_map.sum(dim=-1) == TOPK).all())
    assert replay.metrics["predictor_loss"].isfinite().all()
    # moe_router_fusion=True replays exactly as the unfused router (Megatron's unfused top-k).
    loss_unfused, grads_unfused, _ = _step(unfused, routes)
    assert torch.equal(loss, loss_unfused)
    assert grads.keys() == grads_unfused.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], grads_unfused[name]), name
    assert any("predictor" in name for name in grads)  # the predictor loss reached W_p
